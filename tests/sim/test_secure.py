"""The simulator's secure method on a fresh stack of embedded servers (slow): devices train B on
their cluster's frozen A and run the secure protocol through the aggregator every round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tessera.sim import SimConfig, SimReport
from tessera.sim.devices import cached_base
from tessera.sim.report import published_adapters
from tessera.sim.stack import run_on_fresh_stack
from tessera.stack import StackInfo

# A fresh stack, 4 devices trained one after another, twice; minutes on a busy shared machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# One device process for four devices: a device's protocol waits for its cluster's other
# device, so the protocol must not run inside the pool's processes.
SECURE = SimConfig(
    devices=4,
    styles=2,
    rounds=2,
    method="secure",
    steps=2,
    batch_size=2,
    samples=4,
    eval_images=1,
    eval_steps=2,
    lam=0.0,
    workers=1,
)


def test_secure_rounds_publish_each_cluster_from_its_masked_sum(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def after(info: StackInfo, report: SimReport) -> None:
        headers = {"Authorization": f"Bearer {info.operator_token}"}
        with httpx.Client(base_url=info.urls["aggregator"], timeout=30) as http:
            seen["rounds"] = http.get("/v1/rounds", headers=headers).json()
        seen["adapters"] = published_adapters(
            info.urls["aggregator"], info.operator_token, cached_base("")
        )

    report = run_on_fresh_stack(SECURE, tmp_path / "stack", log=lambda _: None, after=after)

    labels = sorted({d["cluster"] for d in report.devices})
    assert len(labels) >= 1 and None not in labels
    assert [r.round for r in report.rounds] == [1, 2]
    for number, row in enumerate(report.rounds, start=1):
        clusters = sorted(name for name in row.published if name.startswith("cluster:"))
        assert clusters == [f"cluster:{label} v{number}" for label in labels]
        assert 0.0 <= row.style_accuracy <= 1.0 and row.heldout_loss > 0
        assert row.train_seconds_per_device is not None and row.train_seconds_per_device > 0
        # the masked input goes up: 4 bytes per B value and the weight
        assert row.bytes_up_per_device >= 4 * (b_values(seen["adapters"]) + 1)
    secure_rounds = [r for r in seen["rounds"] if r["config"]["method"] == "secure"]
    assert len(secure_rounds) == SECURE.rounds
    assert all(r["state"] == "published" and r["updates"] == 0 for r in secure_rounds)
    for label in labels:  # B trained from 0 on the frozen A
        adapter = seen["adapters"][f"cluster:{label}"]
        assert any(torch.count_nonzero(adapter.pair(m)[1]) > 0 for m in adapter.modules)


def b_values(adapters: dict[str, Any]) -> int:
    """How many values of B one cluster adapter holds."""
    adapter = next(a for name, a in adapters.items() if name.startswith("cluster:"))
    return sum(int(adapter.pair(m)[1].numel()) for m in adapter.modules)
