"""The method, measured on fresh stacks: with the same devices, images, seeds and budget per
device, cluster-aware devices end up generating in their own style and fit their own data
better than devices served one global FedAvg adapter (slow; fixed seeds)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tessera.demo import DEMO_CONFIG, TARGET
from tessera.sim.stack import run_on_fresh_stack

pytestmark = pytest.mark.slow

# The demo's federation with two devices per style instead of three (to keep the suite short)
# and twice the evaluation images (the style accuracy of 18 images moves by 0.1 from round to
# round). In the two demo configurations measured (9 devices, docs/federation.md; and 6 devices
# at 3 steps a round), cluster-aware devices averaged 0.10 and 0.16 more style accuracy than
# global FedAvg's over rounds 2-4 and ended with a held-out loss 16% lower; the margin asserted
# is half the smaller gap.
METHOD = replace(DEMO_CONFIG, devices=6, eval_images=6, seed=0)
MARGIN = 0.05


def test_cluster_aware_devices_reach_their_style_and_global_fedavg_lags(tmp_path: Path) -> None:
    ours = run_on_fresh_stack(replace(METHOD, method="exact"), tmp_path / "exact", log=print)
    theirs = run_on_fresh_stack(replace(METHOD, method="global"), tmp_path / "global", log=print)

    def later_style(report) -> float:
        return float(np.mean([r.style_accuracy for r in report.rounds[1:]]))

    print(f"style accuracy per round: cluster-aware {[r.style_accuracy for r in ours.rounds]}, "
          f"global FedAvg {[r.style_accuracy for r in theirs.rounds]}")  # fmt: skip
    assert ours.ari == pytest.approx(1.0)
    assert later_style(ours) >= later_style(theirs) + MARGIN
    assert ours.rounds[-1].heldout_loss < theirs.rounds[-1].heldout_loss
    reached = ours.rounds_to(TARGET)
    assert reached is not None
    assert reached <= (theirs.rounds_to(TARGET) or METHOD.rounds + 1)
