"""The robustness benchmark runs end to end on made-up updates and writes its report (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_a_synthetic_run_writes_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import robustness

    threads = torch.get_num_threads()
    try:
        robustness.main(
            [
                *("--synthetic", "--attackers", "1", "--attacks", "honest", "scaled"),
                *("--strategies", "unbounded", "norm", "trimmed-2"),
                *("--threads", "1", "--out", str(tmp_path)),
            ]
        )
    finally:
        torch.set_num_threads(threads)

    report = json.loads((tmp_path / "bench_robustness_synthetic.json").read_text())
    change = {(r["attack"], r["strategy"]): r["relative_change"] for r in report["rows"]}
    assert change[("scaled", "unbounded")] > 10  # the x1000 update dominates
    assert change[("scaled", "trimmed-2")] < 0.1  # rejected; two alike honest ones left out
    assert change[("scaled", "norm")] < 5e-3  # rejected alone: the benign mean (fp16 wire)
    assert change[("honest", "unbounded")] < 0.05
    table = (tmp_path / "bench_robustness_synthetic.md").read_text()
    assert (
        "| 1 | scaled |" in table
        and "- `norm`: " in table
        and (tmp_path / "bench_robustness_synthetic.png").stat().st_size > 0
    )
