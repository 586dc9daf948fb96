"""The federation benchmark runs end to end on a small setting and writes its report (slow).

Times are not asserted (this is not a timed test): what is checked is that every update was
aggregated and uploaded for real, and every table and the plot were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_small_run_writes_tables_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import federation_speed

    federation_speed.main(["--counts", "2", "4", "--repeats", "1", "--out", str(tmp_path)])

    report = json.loads((tmp_path / "bench_federation.json").read_text())
    assert [row["updates"] for row in report["aggregation"]] == [2, 4]
    assert [row["rank"] for row in report["uploads"]] == [8, 32]
    for row in report["uploads"]:
        assert row["concurrent"]["n"] == row["concurrent"]["devices"] * 4
        assert row["concurrent"]["uploads_per_s"] > 0
    assert report["uploads"][1]["size_bytes"] > 3 * report["uploads"][0]["size_bytes"]
    table = (tmp_path / "bench_federation.md").read_text()
    assert "| 4 |" in table and "uploads/s" in table
    assert (tmp_path / "bench_federation.png").stat().st_size > 10_000
