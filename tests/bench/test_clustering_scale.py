"""The clustering benchmark runs end to end on a small population and writes its report (slow).

Times are not asserted; what is checked is that each measurement ran (the algorithm on both
paths, the Celery task through a database, assignments over the API) and found the true
clusters, and that the table and the plot were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_small_run_writes_the_table_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import clustering_scale

    clustering_scale.main(
        [
            *("--devices", "1500"),
            *("--exact-n", "300"),
            *("--small-n", "200"),
            *("--large-n", "1000"),
            *("--assignments", "5"),
            *("--threads", "1"),
            *("--out", str(tmp_path)),
        ]
    )

    report = json.loads((tmp_path / "bench_clustering.json").read_text())
    paths = [(row["n"], row["path"], row["k"], row["ari"]) for row in report["algorithm"]]
    assert paths == [
        (300, "exact (KMeans, full silhouette)", 6, 1.0),
        (1500, "MiniBatchKMeans", 6, 1.0),
    ]
    assert [(row["n"], row["state"], row["k"]) for row in report["task"]] == [
        (200, "succeeded", 6),
        (1500, "succeeded", 6),
    ]
    assert [(row["n"], row["samples"]) for row in report["assignment"]] == [(200, 5), (1500, 5)]
    table = (tmp_path / "bench_clustering.md").read_text()
    assert "| 1,500 | MiniBatchKMeans |" in table and "p95" in table
    assert (tmp_path / "bench_clustering.png").stat().st_size > 10_000
