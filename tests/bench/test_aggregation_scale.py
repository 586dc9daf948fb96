"""The aggregation benchmark runs its methods each in its own process on tiny shapes (slow).

Times are not asserted: what is checked is that each method ran for real in a child process
(with a peak above its inputs), that the exact result was compared with the dense reference
(sketched here: 20 rank-4 updates outgrow the exact stack), and the report was written. The
in-memory baselines (floor, Flower, fedavg) are left out to keep the test short: each child
process costs seconds of imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_tiny_run_measures_every_method_and_compares_exact_with_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import aggregation_scale

    # summed rank 4 x 70 = 280, past the exact path's 256: the sketch is what is compared
    sizes = ["--models", "tiny", "--ranks", "4", "--counts", "70"]
    limits = ["--dense-max", "70", "--streamed-max", "70", "--sweep-count", "70"]
    methods = ["--methods", "exact", "dense", "streamed"]
    aggregation_scale.main([*sizes, *limits, *methods, "--out", str(tmp_path)])

    report = json.loads((tmp_path / "bench_aggregation.json").read_text())
    rows = {row["method"]: row for row in report["rows"] if row["method"] != "sweep"}
    sweeps = {row["kind"]: row for row in report["rows"] if row["method"] == "sweep"}
    assert sorted(rows) == ["dense", "exact", "streamed"]
    for row in rows.values():
        assert row["skip"] is None and row["seconds"] > 0
        assert row["peak_bytes"] >= row["inputs_bytes"] > 0
    assert rows["exact"]["sketched"] is True
    assert 0 < rows["dense"]["exact_relative_error"] < 0.5
    assert 1 - 1e-9 <= rows["dense"]["exact_residual_ratio"] < 1.05
    assert rows["exact"]["energy_kept"] == pytest.approx(rows["dense"]["energy_kept"], abs=0.05)
    assert sorted(sweeps) == ["cluster", "flat"]
    for sweep in sweeps.values():
        default, *_, most = sweep["sweep"]
        assert sweep["gap_median"] >= sweep["gap_min"] >= 1
        for cell in sweep["sweep"]:
            # float32 factors: energies meet the optimum to about 1e-7; the residual ratio divides
            # by the small residual left when nearly all energy is kept, so it is looser
            assert cell["energy_of_best"] <= 1 + 1e-6 and cell["residual_ratio"] >= 1 - 1e-4
        assert most["residual_ratio"] <= default["residual_ratio"] + 1e-6  # 7 passes, 16 more
    assert sweeps["cluster"]["gap_median"] > sweeps["flat"]["gap_median"]
    table = (tmp_path / "bench_aggregation.md").read_text()
    assert "The sketch's accuracy against its cost" in table
    assert "| 70 |" in table and "skipped" not in table
    assert (tmp_path / "bench_aggregation.png").stat().st_size > 10_000
