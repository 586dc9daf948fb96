"""`TESSERA_AGGREGATOR_REPLICAS`: `tessera up` runs that many aggregator processes on its port."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.sim.stack import demo_settings
from tessera.stack import Stack


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_aggregator_runs_as_many_processes_as_replicas(tmp_path: Path, replicas: int) -> None:
    stack = Stack(demo_settings(tmp_path, aggregator_replicas=replicas))
    argv = {child.name: child.argv for child in stack._plan_children()}
    aggregator = argv["aggregator"]
    if replicas == 1:
        assert "--workers" not in aggregator
    else:
        assert aggregator[aggregator.index("--workers") + 1] == str(replicas)
    assert all("--workers" not in argv[name] for name in ("clustering", "inference"))
