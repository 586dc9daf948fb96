"""The worker reads each update object once, for every method, and agrees with the same maths
on the updates held in memory: exact, fedavg and private (same noise seed, same result)."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pytest
import torch

from services.worker.aggregation import RoundAggregate, RoundPlan, UpdateRef, aggregate_plan
from services.worker.updates import BoundedUpdates, Compatibility
from tessera.federation import RoundConfig
from tessera.lora import LoraSpec, adapter_to_bytes
from tessera.lora.adapter import LoraAdapter, random_adapter
from tessera.lora.aggregate import (
    WeightedUpdate,
    aggregate_exact,
    aggregate_fedavg,
    aggregate_private,
)
from tessera.lora.bounds import ScaleRange, clip_update, update_norm
from tessera.lora.lowrank import SketchOptions
from tessera.storage import ObjectStore

SPEC = LoraSpec(
    base_model_id="test/read-once",
    base_model_hash="hash-r",
    modules={"a.to_q": (64, 64), "a.to_k": (64, 96), "b.to_q": (96, 96)},
)
SCALES = ScaleRange(1e-3, 16.0)
EXACT = SketchOptions(exact_rank=10**6)  # the stacked path at any summed rank: exact
OUTLIER = 3  # alpha 60: a product 15 times its neighbours', which the bound clips


def stored_updates(store: ObjectStore, count: int, *, dtypes: tuple[str, ...]) -> list[UpdateRef]:
    """`count` rank-4 updates in the store, in the given wire dtypes in turn; 1-3 samples."""
    refs = []
    prefix = f"read-once/{uuid.uuid4().hex}"
    for i in range(count):
        adapter = random_adapter(SPEC, 4, 4.0, seed=i)
        if i == OUTLIER:
            adapter = LoraAdapter(**{**adapter.__dict__, "alpha": 60.0})
        data = adapter_to_bytes(adapter, dtype=dtypes[i % len(dtypes)])
        stored = store.put_bytes(f"{prefix}/{i}", data)
        refs.append(UpdateRef(i, i, stored.key, stored.sha256, 1 + i % 3, None))
    return refs


def aggregate_counting_reads(
    store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
    refs: list[UpdateRef],
    config: RoundConfig,
    *,
    noise_seed: int | None = None,
) -> tuple[RoundAggregate, Counter[str]]:
    """The round's aggregate (one group) and how often each object was read for it."""
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
    outcome = aggregate_plan(plan, store=store, scales=SCALES, noise_seed=noise_seed)
    monkeypatch.setattr(store, "get_bytes", real)
    return outcome, gets


@dataclass
class HeldGroup:
    """The group's updates held in memory, each clipped to the bound with its weight: the
    oracle the worker's one reading is checked against (the batch maths on a list)."""

    updates: list[WeightedUpdate]
    stream: BoundedUpdates


def held(store: ObjectStore, refs: list[UpdateRef], config: RoundConfig) -> HeldGroup:
    """Survey the group as the worker does, keeping every update; then clip and weigh them."""
    rank = config.rank if config.method == "fedavg" else None
    stream = BoundedUpdates(
        refs,
        store=store,
        compatibility=Compatibility(rank=rank),
        scales=SCALES,
        config=config,
        excluded=[],
        seed=1,
    )
    kept: list[tuple[LoraAdapter, float]] = []
    stream.survey(lambda adapter, norm: kept.append((adapter, norm)))
    weights, clips = stream.settled()
    assert stream.bound is not None
    updates = [
        WeightedUpdate(clip_update(adapter, norm=norm, bound=stream.bound)[0], weight)
        for (adapter, norm), weight, clip in zip(kept, weights, clips, strict=True)
        if clip > 0  # 0: left out by the robust rule
    ]
    return HeldGroup(updates, stream)


def relative_error(got: LoraAdapter, want: LoraAdapter) -> float:
    return max(
        float((got.delta(m).double() - want.delta(m).double()).norm() / want.delta(m).norm())
        for m in SPEC.modules
    )


@pytest.mark.parametrize("count", [6, 80])  # summed rank 24 (stacked) and 320 (sketched)
def test_exact_reads_each_update_once_and_equals_the_two_pass_stream(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    refs = stored_updates(store, count, dtypes=("float32",))
    config = RoundConfig(scope="global", method="exact", rank=4, lam=0.0)

    outcome, gets = aggregate_counting_reads(store, monkeypatch, refs, config)

    assert gets == Counter({ref.object_key: 1 for ref in refs})
    (output,) = outcome.outputs
    assert output.metrics["updates"] == count
    group = held(store, refs, config)
    assert group.stream.clipped == 1
    in_memory = aggregate_exact(group.updates, rank=4)
    assert relative_error(output.adapter, in_memory.adapter) < 1e-5
    assert torch.isfinite(torch.tensor(output.metrics["energy_kept"]))


@pytest.mark.parametrize("robust", ["none", "norm"])  # norm: the outlier is left out
def test_fedavg_reads_each_update_once_and_equals_the_two_pass_stream(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch, robust: Literal["none", "norm"]
) -> None:
    refs = stored_updates(store, 7, dtypes=("float16", "float32", "bfloat16"))
    config = RoundConfig(
        scope="global", method="fedavg", rank=4, lam=0.0, robust=robust, robust_norm_ratio=4.0
    )

    outcome, gets = aggregate_counting_reads(store, monkeypatch, refs, config)

    assert gets == Counter({ref.object_key: 1 for ref in refs})
    (output,) = outcome.outputs
    left_out = [e.update_id for e in outcome.excluded]
    assert left_out == ([] if robust == "none" else [OUTLIER])
    assert output.metrics["updates"] == 7 - len(left_out)
    group = held(store, refs, config)
    in_memory = aggregate_fedavg(group.updates, rank=4)
    assert group.stream.clipped == (1 if robust == "none" else 0)
    assert in_memory.tensors.keys() == output.adapter.tensors.keys()
    for key, want in in_memory.tensors.items():  # the same values summed in the same order
        assert torch.equal(output.adapter.tensors[key], want), key
    assert output.adapter.alpha == in_memory.alpha


def test_a_private_round_reads_each_update_once_and_adds_the_same_noise(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = stored_updates(store, 5, dtypes=("float16", "float32"))
    # Rank 64 keeps every module's whole noisy sum; the bound clips the outlier only.
    config = RoundConfig(
        scope="global",
        method="exact",
        rank=64,
        lam=0.0,
        clip="fixed",
        clip_norm=0.5,
        weighting="equal",
        noise_multiplier=0.5,
    )

    outcome, gets = aggregate_counting_reads(store, monkeypatch, refs, config, noise_seed=11)

    assert gets == Counter({ref.object_key: 1 for ref in refs})
    (output,) = outcome.outputs
    assert output.metrics["updates"] == 5
    group = held(store, refs, config)
    in_memory = aggregate_private(
        group.updates,  # clipped by the worker, then by the mechanism
        rank=64,
        clip_norm=0.5,
        noise_multiplier=0.5,
        count=group.stream.received,
        generator=torch.Generator().manual_seed(11),
    )
    assert group.stream.clipped == 1
    assert relative_error(output.adapter, in_memory.adapter) < 1e-5
    other = aggregate_counting_reads(store, monkeypatch, refs, config, noise_seed=12)[0]
    (another,) = other.outputs
    assert relative_error(another.adapter, in_memory.adapter) > 0.01  # the noise is seen


def test_a_rounds_power_passes_bring_its_sketch_nearer_the_best_truncation(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = stored_updates(store, 80, dtypes=("float32",))  # summed rank 320: sketched
    results = {}
    for passes in (0, 6):
        config = RoundConfig(scope="global", method="exact", rank=4, lam=0.0, power_passes=passes)
        outcome, _ = aggregate_counting_reads(store, monkeypatch, refs, config)
        (output,) = outcome.outputs
        results[passes] = output
    config = RoundConfig(scope="global", method="exact", rank=4, lam=0.0)
    best = aggregate_exact(held(store, refs, config).updates, rank=4, options=EXACT)

    # Flat updates: the best truncation is ill-conditioned, so compare residuals, not factors.
    # Each result is a projection of M: ||M - X||^2 = ||M||^2 - ||X||^2.
    best_kept = update_norm(best.adapter) ** 2
    total = best_kept / best.energy_kept
    excess = {
        p: ((total - update_norm(out.adapter) ** 2) / (total - best_kept)) ** 0.5 - 1
        for p, out in results.items()
    }
    assert 0 <= excess[6] < excess[0] / 2, excess
