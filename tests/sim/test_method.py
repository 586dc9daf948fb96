"""The method, measured on fresh stacks: with the same devices, images, seeds and budget per
device, cluster-aware devices end up generating in their own style more often, and reach the
target sooner, than devices served one global FedAvg adapter (slow; fixed seeds; the demo's
run of tests/sim/conftest.py)."""

from __future__ import annotations

import pytest

from tests.sim.conftest import METHOD, DemoRun

# The first test to run sets up the shared demo run (three federations): twice the usual limit;
# under pytest-xdist the tests sharing it run on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.xdist_group("demo")]

# Measured on pretraining run 5 with stripes, outline and gradient (2026-12-01, one run while
# other jobs shared the cores): style accuracy 0.53/0.19/0.83/0.83 for cluster-aware against
# 0.53/0.22/0.25/0.69 for global FedAvg; cluster-aware reaches 0.8 in round 3, global FedAvg
# not within the 4 rounds. The final margin asserted is one image in 36 more.
MARGIN = 0.03


def _accuracy(run: dict) -> list[float]:
    return [r["style_accuracy"] for r in run["rounds"]]


def test_cluster_aware_devices_reach_their_style_and_global_fedavg_lags(demo_run: DemoRun) -> None:
    ours = demo_run.result["methods"]["cluster-aware (exact)"]
    theirs = demo_run.result["methods"]["global FedAvg"]

    final_ours, final_theirs = ours["rounds"][-1], theirs["rounds"][-1]
    print(f"style accuracy per round: cluster-aware {_accuracy(ours)}, global FedAvg "
          f"{_accuracy(theirs)}; held-out loss {final_ours['heldout_loss']:.4f} against "
          f"{final_theirs['heldout_loss']:.4f}")  # fmt: skip
    assert len(ours["rounds"]) == len(theirs["rounds"]) == METHOD.rounds
    assert ours["ari"] == pytest.approx(1.0)
    assert final_ours["style_accuracy"] >= final_theirs["style_accuracy"] + MARGIN
    headline = demo_run.result["headline"]
    reached = headline["cluster-aware (exact)"]["rounds_to_target"]
    assert reached is not None
    assert reached <= (headline["global FedAvg"]["rounds_to_target"] or METHOD.rounds + 1)
