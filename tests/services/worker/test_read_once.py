"""The worker's exact aggregation reads each update object once and agrees with the maths."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import torch

from services.worker.aggregation import RoundPlan, UpdateRef, aggregate_plan
from services.worker.updates import BoundedUpdates, Compatibility
from tessera.federation import RoundConfig
from tessera.lora import LoraSpec, adapter_to_bytes
from tessera.lora.adapter import LoraAdapter, random_adapter
from tessera.lora.aggregate import aggregate_exact
from tessera.lora.bounds import ScaleRange
from tessera.storage import ObjectStore

SPEC = LoraSpec(
    base_model_id="test/read-once",
    base_model_hash="hash-r",
    modules={"a.to_q": (64, 64), "a.to_k": (64, 96), "b.to_q": (96, 96)},
)
SCALES = ScaleRange(1e-3, 16.0)


@pytest.mark.parametrize("count", [6, 80])  # summed rank 24 (stacked) and 320 (sketched)
def test_exact_reads_each_update_once_and_equals_the_two_pass_stream(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    refs = []
    prefix = f"read-once/{uuid.uuid4().hex}"
    for i in range(count):
        adapter = random_adapter(SPEC, 4, 4.0, seed=i)
        if i == 3:  # an outlier the adaptive bound clips
            adapter = LoraAdapter(**{**adapter.__dict__, "alpha": 60.0})
        stored = store.put_bytes(f"{prefix}/{i}", adapter_to_bytes(adapter, dtype="float32"))
        refs.append(UpdateRef(i, i, stored.key, stored.sha256, 1 + i % 3, None))
    config = RoundConfig(scope="global", method="exact", rank=4, lam=0.0)
    gets: Counter[str] = Counter()
    real = store.get_bytes

    def counted(key: str, **kwargs: Any) -> bytes:
        gets[key] += 1
        return real(key, **kwargs)

    monkeypatch.setattr(store, "get_bytes", counted)
    plan = RoundPlan(
        round_id=1,
        config=config,
        opened_at=datetime.now(UTC),
        clustering_id=None,
        groups={None: refs},
        centroids={},
    )

    outcome = aggregate_plan(plan, store=store, scales=SCALES)

    assert gets == Counter({ref.object_key: 1 for ref in refs})
    (output,) = outcome.outputs
    assert output.metrics["updates"] == count
    gets.clear()
    stream = BoundedUpdates(
        refs,
        store=store,
        compatibility=Compatibility(rank=None),
        scales=SCALES,
        config=config,
        excluded=[],
        seed=1,
    )
    stream.survey()
    assert stream.clipped == 0  # counted on the maths' pass
    two_pass = aggregate_exact(stream, rank=4)  # read again, each update clipped as it comes
    assert stream.clipped == 1
    for module in SPEC.modules:
        want = two_pass.adapter.delta(module).double()
        got = output.adapter.delta(module).double()
        assert float((got - want).norm() / want.norm()) < 1e-5
    assert torch.isfinite(torch.tensor(output.metrics["energy_kept"]))
