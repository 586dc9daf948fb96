"""The inference benchmark runs end to end on a small setting and writes its report (slow).

Times are not asserted (this is not a timed test); what is checked is that both systems ran
the same computation and every table and the plot were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_small_run_writes_tables_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import inference_speed

    inference_speed.main(
        [
            *("--counts", "1", "3"),
            *("--switches", "6"),
            *("--repeats", "1"),
            *("--batches", "1"),
            *("--cold-loads", "4"),
            *("--out", str(tmp_path)),
        ]
    )

    report = json.loads((tmp_path / "bench_inference.json").read_text())
    assert report["max_difference"] < 1e-3
    assert [row["cached_adapters"] for row in report["switch"]] == [1, 3]
    assert all(row["tessera"]["n"] == row["diffusers"]["n"] == 6 for row in report["switch"])
    assert report["cold_load"]["tessera_get"]["n"] == 2
    assert [row["batch"] for row in report["generation"]] == [1]
    assert [(g["jobs"], g["images_each"]) for g in report["grouping"]] == [(1, 1), (4, 1)]
    table = (tmp_path / "bench_inference.md").read_text()
    assert "| 3 |" in table and "Tessera / floor" in table
    assert (tmp_path / "bench_inference.png").stat().st_size > 10_000
