"""The mixed-batch benchmark runs end to end on a small setting and writes its report (slow).

Times are not asserted (this is not a timed test); what is checked is that the mixed batch
gave each job the image it gets alone, and that the table and the plot were written.
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
    import mixed_batches

    mixed_batches.main(
        [
            *("--jobs", "3"),
            *("--steps", "2"),
            *("--repeats", "1"),
            "--skip-sd",
            *("--threads", "1"),
            *("--out", str(tmp_path)),
        ]
    )

    report = json.loads((tmp_path / "bench_mixed_batches.json").read_text())
    (row,) = report["models"]
    assert (row["jobs"], row["steps"], row["conv_layers"] > 0) == (3, 2, True)
    assert row["max_difference"] <= mixed_batches.TOLERANCE < row["adapter_effect"]
    assert all(len(samples) == 1 for samples in row["samples_s"].values())
    table = (tmp_path / "bench_mixed_batches.md").read_text()
    assert "| bundled tiny model | 3 x 2 |" in table and "mixed vs shared" in table
    assert (tmp_path / "bench_mixed_batches.png").stat().st_size > 10_000
