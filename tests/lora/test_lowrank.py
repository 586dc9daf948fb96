"""Streamed exact aggregation against the dense reference: exact paths, sketch error, memory."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator

import pytest
import torch

from tessera.lora import lowrank
from tessera.lora.adapter import A_SUFFIX, B_SUFFIX, LoraAdapter, LoraSpec, random_adapter
from tessera.lora.aggregate import (
    CHUNK_RANK,
    WeightedUpdate,
    aggregate_exact,
    global_adapter,
    neighbour_blend,
    neighbour_weights,
)
from tessera.lora.aggregate_dense import aggregate_exact_dense, relative_error
from tessera.lora.lowrank import DEFAULT_SKETCH, LowRankSum, SketchOptions

# wider than the default sketch (rank + 8), so only the stacked path or a sketch can be exact
WIDE = LoraSpec(
    base_model_id="test/wide",
    base_model_hash="hash-w",
    modules={
        "a.to_q": (48, 40),
        "b.to_q": (48, 40),  # same shape as a.to_q: one batch
        "c.to_k": (32, 56),
        "d.conv1": (24, 8, 3, 3),
    },
    targets="full",
)
SKETCH_ONLY = SketchOptions(exact_rank=0)  # every update goes through the range sketch


def update(rank: int, seed: int, weight: float = 1.0, alpha: float | None = None) -> WeightedUpdate:
    adapter = random_adapter(WIDE, rank, float(rank) if alpha is None else alpha, seed=seed)
    return WeightedUpdate(adapter, weight)


def assert_same_products(got: LoraAdapter, want: LoraAdapter, tolerance: float = 1e-5) -> None:
    assert got.modules == want.modules
    for module in want.modules:
        expected = want.delta(module).double()
        scale = expected.abs().max().item()
        torch.testing.assert_close(
            got.delta(module).double(), expected, rtol=0, atol=tolerance * scale
        )


def test_stacked_path_is_exact_for_mixed_ranks_weights_and_conv_pairs() -> None:
    updates = [update(r, seed=r, weight=w, alpha=a) for r, w, a in ((2, 1.0, 8.0), (3, 4.0, 3.0))]
    updates += [update(4, seed=9, weight=0.5), update(1, seed=7, weight=0.0)]

    result = aggregate_exact(iter(updates), rank=6)
    reference = aggregate_exact_dense(updates, rank=6)

    assert not result.sketched
    assert_same_products(result.adapter, reference.adapter)
    assert result.energy_kept == pytest.approx(reference.energy_kept, abs=1e-9)
    assert result.adapter.pair("d.conv1")[0].shape == (6, 8, 3, 3)


def test_sketch_is_exact_when_the_mean_has_low_rank() -> None:
    basis = torch.randn(48, 3, generator=torch.Generator().manual_seed(0))
    updates = []
    for seed in range(12):  # 12 rank-3 updates, all with B in one 3-dimensional column space
        adapter = update(3, seed=seed).adapter
        mixed = torch.randn(3, 3, generator=torch.Generator().manual_seed(100 + seed))
        tensors = {**adapter.tensors, "a.to_q" + B_SUFFIX: basis @ mixed}
        updates.append(WeightedUpdate(LoraAdapter(**{**adapter.__dict__, "tensors": tensors}), 1))

    result = aggregate_exact(updates, rank=4, options=SKETCH_ONLY)
    reference = aggregate_exact_dense(updates, rank=4)

    assert result.sketched
    a_only = ("a.to_q",)
    for module in a_only:
        want = reference.adapter.delta(module).double()
        got = result.adapter.delta(module).double()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
        assert result.module_energy[module] == pytest.approx(1.0, abs=1e-6)  # float32 passes


def decaying(seed: int, rank: int = 4) -> WeightedUpdate:
    """A shared strong direction plus a small update of its own: a cluster's typical spectrum."""
    shared = random_adapter(WIDE, rank, float(rank), seed=1000)
    own = random_adapter(WIDE, rank, float(rank), seed=seed)
    tensors = {
        key: shared.tensors[key] + (0.5 if key.endswith(A_SUFFIX) else 0.3) * own.tensors[key]
        for key in shared.tensors
    }
    return WeightedUpdate(LoraAdapter(**{**shared.__dict__, "tensors": tensors}), 1.0 + seed % 3)


def test_sketch_error_against_the_dense_truncation_stays_within_1e_3() -> None:
    updates = [decaying(seed) for seed in range(40)]

    result = aggregate_exact(updates, rank=4, options=SKETCH_ONLY)
    rough = aggregate_exact(
        updates, rank=4, options=SketchOptions(exact_rank=0, oversample=0, power_passes=0)
    )
    reference = aggregate_exact_dense(updates, rank=4)

    assert result.sketched
    error = relative_error(result.adapter, reference.adapter)
    assert error <= 1e-3
    assert relative_error(rough.adapter, reference.adapter) > 10 * error
    assert result.energy_kept == pytest.approx(reference.energy_kept, abs=0.02)


CLUSTER = LoraSpec(
    base_model_id="test/cluster",
    base_model_hash="hash-c",
    modules={"a.to_q": (320, 320), "a.to_k": (320, 768), "b.to_q": (640, 640)},
)


def cluster_update(seed: int, rank: int) -> WeightedUpdate:
    """A device of a cluster: the cluster's shared update plus half as much of its own."""
    shared = random_adapter(CLUSTER, rank, float(rank), seed=10**6)
    own = random_adapter(CLUSTER, rank, float(rank), seed=seed)
    tensors = {key: shared.tensors[key] + 0.5 * own.tensors[key] for key in shared.tensors}
    return WeightedUpdate(LoraAdapter(**{**shared.__dict__, "tensors": tensors}), 1.0 + seed % 5)


@pytest.mark.parametrize("rank", [4, 16])
def test_default_sketch_meets_1e_3_on_cluster_like_updates_of_real_width(rank: int) -> None:
    updates = [cluster_update(seed, rank) for seed in range(1024 // rank)]  # summed rank 1024

    result = aggregate_exact(updates, rank=rank)
    reference = aggregate_exact_dense(updates, rank=rank)

    assert result.sketched
    assert relative_error(result.adapter, reference.adapter) <= 1e-3
    assert result.energy_kept == pytest.approx(reference.energy_kept, abs=1e-3)


def test_stacked_path_is_exact_beyond_the_module_width() -> None:
    # summed rank 8 * 12 + 4 * 10 = 136: above the old limit of 64 and above every module's
    # smaller side (at most 48), still exact from the QR of the stacked factors
    updates = [update(8, seed=s, weight=1.0 + s % 3) for s in range(12)]
    updates += [update(4, seed=100 + s, weight=0.5, alpha=2.0) for s in range(10)]

    result = aggregate_exact(updates, rank=6)
    reference = aggregate_exact_dense(updates, rank=6)

    assert not result.sketched
    assert_same_products(result.adapter, reference.adapter)
    assert result.energy_kept == pytest.approx(reference.energy_kept, abs=1e-9)
    assert result.adapter.pair("d.conv1")[0].shape == (6, 8, 3, 3)


def test_stacked_path_in_slices_of_one_module_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    # a budget below one module's float64 copies: every module of a group is its own slice
    updates = [update(8, seed=s, weight=1.0 + s % 3) for s in range(6)]
    whole = aggregate_exact(updates, rank=6)
    monkeypatch.setattr(lowrank, "STACKED_SLICE_BYTES", 1)

    sliced = aggregate_exact(updates, rank=6)

    assert not sliced.sketched
    assert_same_products(sliced.adapter, whole.adapter, tolerance=1e-9)
    assert sliced.energy_kept == pytest.approx(whole.energy_kept, abs=1e-12)


def test_global_adapter_and_blend_agree_with_the_dense_reference() -> None:
    clusters = {c: update(4, seed=i).adapter for i, c in enumerate("abc")}
    centroids = {"a": [1.0, 0.0], "b": [0.8, 0.3], "c": [-0.5, 1.0]}
    weights = neighbour_weights(centroids, temperature=0.5)

    overall = global_adapter(
        [WeightedUpdate(a, 2.0 + i) for i, a in enumerate(clusters.values())], rank=8
    )
    blended = neighbour_blend(clusters, centroids, lam=0.4, temperature=0.5, rank=8)

    want = aggregate_exact_dense(
        [WeightedUpdate(a, 2.0 + i) for i, a in enumerate(clusters.values())], rank=8
    )
    assert_same_products(overall.adapter, want.adapter)
    for c, result in blended.items():
        mix = [WeightedUpdate(clusters[c], 0.6)]
        mix += [WeightedUpdate(clusters[j], 0.4 * p) for j, p in weights[c].items()]
        assert_same_products(result.adapter, aggregate_exact_dense(mix, rank=8).adapter)


class Regenerated:
    """A re-iterable source that builds each update when asked, as a store-backed stream does."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.alive = self.peak = self.reads = 0

    def __iter__(self) -> Iterator[WeightedUpdate]:
        self.reads += 1
        for seed in range(self.count):
            adapter = update(4, seed=seed).adapter
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(adapter, self._gone)
            yield WeightedUpdate(adapter, 1.0 + seed % 4)

    def _gone(self) -> None:
        self.alive -= 1


@pytest.mark.parametrize("count", [10, 120])
def test_updates_are_read_once_and_memory_past_the_budget_goes_to_a_file(count: int) -> None:
    source = Regenerated(count)
    shapes = {m: (s[0], math.prod(s[1:])) for m, s in WIDE.modules.items()}
    spilling = SketchOptions(resident_bytes=0)
    low_rank = LowRankSum(shapes, rank=4, options=spilling)
    updates = [u.adapter for u in Regenerated(count)]
    for start in range(0, count, 5):
        low_rank.add(
            [({m: a.flat_pair(m) for m in a.modules}, 1.0) for a in updates[start : start + 5]]
        )
        assert low_rank.resident_values == 0
    assert low_rank.spilled_bytes == 4 * count * sum(4 * (o + i) for o, i in shapes.values())
    low_rank.finish()

    result = aggregate_exact(source, rank=4, options=spilling)
    resident = aggregate_exact(updates_of(count), rank=4)

    assert source.reads == 1  # one pass over the source, whatever the number of sketch passes
    assert source.peak <= CHUNK_RANK // 4 + 1 and source.alive == 0
    assert result.adapter.extra["updates"] == str(count)
    assert result.sketched == (count * 4 > DEFAULT_SKETCH.exact_rank)
    assert_same_products(result.adapter, resident.adapter, tolerance=1e-6)


def updates_of(count: int) -> list[WeightedUpdate]:
    return [update(4, seed=seed, weight=1.0 + seed % 4) for seed in range(count)]
