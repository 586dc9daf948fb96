"""The stragglers benchmark's report: when each mode reaches the target, its table and plot.

The measured run itself (two fresh stacks, about 25 minutes) is `make bench`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


def timeline(*points: tuple[float, float]) -> list[dict]:
    return [
        {"seconds": seconds, "versions": count, "loss": loss, "stale_updates": count % 2}
        for count, (seconds, loss) in enumerate(points)
    ]


def test_the_report_names_when_each_mode_reached_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import stragglers
    from benchlib import write_report

    runs = {
        "sync": {"timeline": timeline((0, 0.13), (110, 0.07), (230, 0.05))},
        "buffered": {"timeline": timeline((0, 0.13), (60, 0.08), (80, 0.06), (210, 0.055))},
    }
    for run in runs.values():
        run.update(stragglers.reached(run["timeline"], 0.065))
    never = stragglers.reached(timeline((0, 0.13), (50, 0.1)), 0.065)
    report = {
        "machine": "test machine",
        "command": "python bench/stragglers.py",
        "config": {
            "devices": 8,
            "styles": 2,
            "slow": 2,
            "factor": 4.0,
            "steps": 8,
            "rounds": 3,
            "buffer_k": 2,
            "staleness_exponent": 0.5,
        },
        "target_share": 0.8,
        "base_loss": 0.13,
        "target_loss": 0.065,
        "runs": runs,
    }

    write_report(
        report, tmp_path, "bench_stragglers", markdown=stragglers.markdown, plot=stragglers.plot
    )

    assert (runs["sync"]["seconds_to_target"], runs["sync"]["versions_to_target"]) == (230, 2)
    assert (runs["buffered"]["seconds_to_target"], runs["buffered"]["versions_to_target"]) == (
        80,
        2,
    )
    assert never["seconds_to_target"] is None and never["final_loss"] == 0.1
    table = (tmp_path / "bench_stragglers.md").read_text()
    assert "| sync | 2 | 230.0 | 2 | 230.0 | 0.0500 | 0.0500 (230.0) |" in table
    assert "| buffered | 2 | 80.0 | 3 | 210.0 | 0.0550 | 0.0550 (210.0) |" in table
    assert "staleness_exponent: 0.5" in table
    assert (tmp_path / "bench_stragglers.png").stat().st_size > 0
    assert json.loads((tmp_path / "bench_stragglers.json").read_text())["target_loss"] == 0.065
