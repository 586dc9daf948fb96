"""Aggregation maths: exact product averaging, FedAvg, neighbour blending, streaming, errors."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch

from tessera.lora.adapter import A_SUFFIX, B_SUFFIX, LoraAdapter, LoraSpec, zeros_like_spec
from tessera.lora.adapter import random_adapter as make_random
from tessera.lora.aggregate import (
    CHUNK_RANK,
    FedAvgSum,
    WeightedUpdate,
    aggregate_exact,
    aggregate_fedavg,
    global_adapter,
    neighbour_blend,
    neighbour_weights,
)
from tessera.lora.lowrank import SketchOptions

SPEC = LoraSpec(
    base_model_id="test/tiny",
    base_model_hash="hash-0",
    modules={"down.to_q": (16, 24), "mid.to_k": (8, 16), "up.to_out.0": (12, 12)},
)


def random_adapter(rank: int, *, seed: int, alpha: float | None = None) -> LoraAdapter:
    return make_random(SPEC, rank, float(rank) if alpha is None else alpha, seed=seed, std=0.3)


def products(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {module: adapter.delta(module).double() for module in adapter.modules}


def weighted_mean(updates: list[WeightedUpdate], spec: LoraSpec = SPEC) -> dict[str, torch.Tensor]:
    total = sum(u.weight for u in updates)
    means = {m: torch.zeros(shape, dtype=torch.float64) for m, shape in spec.modules.items()}
    for update in updates:
        for module, product in products(update.adapter).items():
            means[module] += product * (update.weight / total)
    return means


def assert_products(adapter: LoraAdapter, expected: dict[str, torch.Tensor]) -> None:
    assert list(adapter.modules) == sorted(expected)
    for module, want in expected.items():
        got = adapter.delta(module).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_exact_reproduces_weighted_mean_when_ranks_fit() -> None:
    updates = [
        WeightedUpdate(random_adapter(2, seed=1, alpha=4.0), 1.0),
        WeightedUpdate(random_adapter(3, seed=2, alpha=3.0), 5.0),
        WeightedUpdate(random_adapter(3, seed=3, alpha=16.0), 2.5),
    ]

    result = aggregate_exact(iter(updates), rank=8)

    assert_products(result.adapter, weighted_mean(updates))
    assert result.energy_kept == pytest.approx(1.0, abs=1e-6)
    assert all(e == pytest.approx(1.0, abs=1e-6) for e in result.module_energy.values())
    assert (result.adapter.rank, result.adapter.alpha) == (8, 8.0)
    assert result.adapter.extra["method"] == "exact" and result.adapter.extra["updates"] == "3"
    assert result.adapter.base_model_hash == SPEC.base_model_hash
    assert all(t.dtype == torch.float32 for t in result.adapter.tensors.values())


def test_exact_with_alpha_divides_out_the_scale() -> None:
    updates = [WeightedUpdate(random_adapter(2, seed=1), 1.0)]

    result = aggregate_exact(updates, rank=4, alpha=32.0)

    assert result.adapter.alpha == 32.0 and result.adapter.scale == 8.0
    assert_products(result.adapter, weighted_mean(updates))


def test_weights_are_normalised() -> None:
    adapters = [random_adapter(2, seed=s) for s in range(3)]

    plain = aggregate_exact([WeightedUpdate(a, 2.0**i) for i, a in enumerate(adapters)], rank=6)
    scaled = aggregate_exact(
        [WeightedUpdate(a, 7 * 2.0**i) for i, a in enumerate(adapters)], rank=6
    )
    single = aggregate_exact([WeightedUpdate(adapters[0], 123.4)], rank=6)

    assert_products(scaled.adapter, products(plain.adapter))
    assert_products(single.adapter, products(adapters[0]))


@pytest.mark.parametrize("rank", [8, 16])
def test_mixed_ranks_give_the_best_approximation_at_the_target_rank(rank: int) -> None:
    updates = [WeightedUpdate(random_adapter(r, seed=r), float(r)) for r in (2, 4, 8)]
    expected = weighted_mean(updates)

    result = aggregate_exact(updates, rank=rank)

    for module, want in expected.items():
        out_features, in_features = SPEC.modules[module]
        a, b = result.adapter.pair(module)
        assert a.shape == (rank, in_features) and b.shape == (out_features, rank)
        s = torch.linalg.svdvals(want)
        best_error = s[rank:].square().sum().sqrt()
        error = torch.linalg.matrix_norm(result.adapter.delta(module).double() - want)
        assert error.item() == pytest.approx(best_error.item(), abs=1e-5 * s[0].item())
    if rank == 16:
        assert result.energy_kept == pytest.approx(1.0, abs=1e-6)
    else:
        assert result.energy_kept < 1.0


def known_spectrum(singular_values: list[float]) -> LoraAdapter:
    """An adapter whose every module is U diag(s) V^T with orthonormal U, V (scale 1)."""
    rank = len(singular_values)
    s = torch.tensor(singular_values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out_features, in_features) in SPEC.modules.items():
        u, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator).double())
        v, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator).double())
        tensors[module + B_SUFFIX] = (u * s).float()
        tensors[module + A_SUFFIX] = v.T.contiguous().float()
    return LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=float(rank),
        base_model_id=SPEC.base_model_id,
        base_model_hash=SPEC.base_model_hash,
    )


def test_truncation_keeps_the_top_singular_directions() -> None:
    adapter = known_spectrum([4.0, 3.0, 2.0, 1.0])

    result = aggregate_exact([WeightedUpdate(adapter, 1.0)], rank=2)

    for module in SPEC.modules:
        a, b = adapter.pair(module)
        top = (b[:, :2] @ a[:2]).double()
        torch.testing.assert_close(result.adapter.delta(module).double(), top, atol=1e-5, rtol=0)
        assert result.module_energy[module] == pytest.approx(25 / 30)
    assert result.energy_kept == pytest.approx(25 / 30)
    assert result.adapter.extra["energy_kept"] == "0.833333"


def test_all_zero_updates_keep_all_energy() -> None:
    result = aggregate_exact([WeightedUpdate(zeros_like_spec(SPEC, 4, 4.0), 1.0)], rank=2)

    assert result.energy_kept == 1.0
    assert all(t.abs().max() == 0 for t in result.adapter.tensors.values())


def test_fedavg_differs_from_exact_but_agrees_on_one_update() -> None:
    first, second = random_adapter(4, seed=1), random_adapter(4, seed=2)
    pair = [WeightedUpdate(first, 1.0), WeightedUpdate(second, 3.0)]

    fedavg = aggregate_fedavg(pair)
    exact = aggregate_exact(pair, rank=8)
    lone = aggregate_fedavg([WeightedUpdate(first, 5.0)])

    a_mean = (first.tensors["mid.to_k" + A_SUFFIX] + 3 * second.tensors["mid.to_k" + A_SUFFIX]) / 4
    torch.testing.assert_close(fedavg.tensors["mid.to_k" + A_SUFFIX], a_mean)
    gap = torch.linalg.matrix_norm(fedavg.delta("mid.to_k") - exact.adapter.delta("mid.to_k"))
    assert gap > 0.1 * torch.linalg.matrix_norm(exact.adapter.delta("mid.to_k"))
    assert (fedavg.rank, fedavg.alpha, fedavg.extra["method"]) == (4, 4.0, "fedavg")
    assert_products(lone, products(first))
    for key, value in first.tensors.items():
        torch.testing.assert_close(lone.tensors[key], value)


def test_fedavg_folds_a_different_alpha_into_b() -> None:
    first, second = random_adapter(4, seed=1, alpha=4.0), random_adapter(4, seed=2, alpha=8.0)
    doubled_b = {
        k: v * 2 if k.endswith(B_SUFFIX) else v for k, v in second.tensors.items()
    }  # alpha 8 at rank 4 is the same update as alpha 4 with B doubled
    same = replace(second, tensors=doubled_b, alpha=4.0)

    mixed = aggregate_fedavg([WeightedUpdate(first, 1.0), WeightedUpdate(second, 1.0)])
    plain = aggregate_fedavg([WeightedUpdate(first, 1.0), WeightedUpdate(same, 1.0)])

    assert mixed.alpha == 4.0
    for key, value in plain.tensors.items():
        torch.testing.assert_close(mixed.tensors[key], value)


def test_global_adapter_is_the_size_weighted_exact_mean() -> None:
    clusters = [WeightedUpdate(random_adapter(2, seed=s), 10.0 * (s + 1)) for s in range(3)]

    result = global_adapter(clusters, rank=6)

    assert_products(result.adapter, weighted_mean(clusters))
    assert result.adapter.extra["method"] == "global"


CENTROIDS = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [-1.0, 0.2]}


def test_neighbour_weights_follow_similarity_with_each_cluster_its_own_closest() -> None:
    weights = neighbour_weights(CENTROIDS, temperature=0.5)

    assert set(weights["a"]) == {"a", "b", "c"}
    assert weights["a"]["a"] > weights["a"]["b"] > weights["a"]["c"]
    assert weights["c"]["c"] > weights["c"]["b"] > weights["c"]["a"]
    for row in weights.values():
        assert sum(row.values()) == pytest.approx(1.0)
    cos_ab, cos_ac = 0.9 / math.hypot(0.9, 0.1), -1.0 / math.hypot(1.0, 0.2)
    logits = [1 / 0.5, cos_ab / 0.5, cos_ac / 0.5]
    total = sum(math.exp(x) for x in logits)
    assert weights["a"]["b"] == pytest.approx(math.exp(logits[1]) / total)
    assert weights["a"]["a"] == pytest.approx(math.exp(logits[0]) / total)


def test_dissimilar_clusters_share_next_to_nothing_and_twins_share_evenly() -> None:
    far = neighbour_weights({"x": [1.0, 0.0], "y": [0.0, 1.0]}, temperature=0.1)
    twins = neighbour_weights({"x": [1.0, 0.0], "y": [2.0, 0.0]}, temperature=0.1)

    assert far["x"]["y"] == pytest.approx(1 / (1 + math.exp(10)))
    assert twins["x"]["y"] == pytest.approx(0.5)


def test_neighbour_blend_with_lam_zero_returns_own_adapters() -> None:
    clusters = {c: random_adapter(2 + i, seed=i) for i, c in enumerate(CENTROIDS)}

    blended = neighbour_blend(clusters, CENTROIDS, lam=0.0, temperature=0.5, rank=4)
    alone = neighbour_blend({"a": clusters["a"]}, {"a": [1.0]}, lam=0.7, temperature=1, rank=4)

    assert all(blended[c].adapter is clusters[c] for c in clusters)
    assert all(r.energy_kept == 1.0 for r in blended.values())
    assert alone["a"].adapter is clusters["a"]


def test_neighbour_blend_with_lam_one_is_the_similarity_mix_itself_included() -> None:
    clusters = {"a": random_adapter(2, seed=1), "b": zeros_like_spec(SPEC, 2, 2.0)}
    clusters["c"] = zeros_like_spec(SPEC, 3, 3.0)
    weights = neighbour_weights(CENTROIDS, temperature=0.5)

    blended = neighbour_blend(clusters, CENTROIDS, lam=1.0, temperature=0.5, rank=4)

    own = products(clusters["a"])
    for c in ("a", "b"):  # b and c hold zeros: only a's product, by its share, remains
        expected = {m: product.double() * weights[c]["a"] for m, product in own.items()}
        assert_products(blended[c].adapter, expected)


def test_neighbour_blend_mixes_exactly_by_similarity() -> None:
    clusters = {c: random_adapter(2, seed=i) for i, c in enumerate(CENTROIDS)}
    weights = neighbour_weights(CENTROIDS, temperature=0.5)

    blended = neighbour_blend(clusters, CENTROIDS, lam=0.3, temperature=0.5, rank=6)

    for c, result in blended.items():
        mix = [WeightedUpdate(clusters[j], 0.3 * p + 0.7 * (j == c)) for j, p in weights[c].items()]
        assert_products(result.adapter, weighted_mean(mix))
        assert result.adapter.extra["method"] == "neighbour_blend"
        assert result.adapter.extra["lam"] == "0.3"


def test_neighbour_blend_rejects_bad_parameters() -> None:
    clusters = {c: random_adapter(2, seed=i) for i, c in enumerate(CENTROIDS)}

    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\], got 1.5"):
        neighbour_blend(clusters, CENTROIDS, lam=1.5, temperature=1.0, rank=4)
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got 0"):
        neighbour_blend(clusters, CENTROIDS, lam=0.5, temperature=0.0, rank=4)
    with pytest.raises(ValueError, match=r"cluster 'c' has shape \(3,\)"):
        bad = {**CENTROIDS, "c": [1.0, 2.0, 3.0]}
        neighbour_blend(clusters, bad, lam=0.5, temperature=1.0, rank=4)
    with pytest.raises(ValueError, match="cluster 'c' needs both an adapter and a centroid"):
        neighbour_blend(
            clusters, {"a": [1.0, 0.0], "b": [0.0, 1.0]}, lam=0.5, temperature=1, rank=4
        )


class AliveCounter:
    """Counts the yielded adapters (and their tensors) that are still referenced anywhere."""

    def __init__(self) -> None:
        self.alive = self.peak = self.tensors_alive = self.tensors_peak = 0

    def track(self, adapter: LoraAdapter) -> LoraAdapter:
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(adapter, self._adapter_gone)
        for tensor in adapter.tensors.values():
            self.tensors_alive += 1
            self.tensors_peak = max(self.tensors_peak, self.tensors_alive)
            weakref.finalize(tensor, self._tensor_gone)
        return adapter

    def _adapter_gone(self) -> None:
        self.alive -= 1

    def _tensor_gone(self) -> None:
        self.tensors_alive -= 1


BIG = LoraSpec(
    base_model_id="test/big", base_model_hash="hash-b", modules={"p": (256, 256), "q": (128, 256)}
)


def big_adapter(seed: int) -> LoraAdapter:
    return make_random(BIG, 4, 4.0, seed=seed)


def big_mean(n: int) -> dict[str, torch.Tensor]:
    total = sum(range(1, n + 1))
    sums = {m: torch.zeros(shape, dtype=torch.float64) for m, shape in BIG.modules.items()}
    for i in range(n):
        adapter = big_adapter(i)
        for module in sums:
            sums[module] += adapter.delta(module).double() * ((i + 1) / total)
    return sums


class Regenerating:
    """A re-iterable source of BIG updates, built when read (as the worker's store stream is)."""

    def __init__(self, n: int, counter: AliveCounter) -> None:
        self.n, self.counter = n, counter

    def __iter__(self) -> Iterator[WeightedUpdate]:
        for i in range(self.n):
            yield WeightedUpdate(self.counter.track(big_adapter(i)), i + 1)


def run_exact(updates: Regenerating) -> LoraAdapter:
    return aggregate_exact(updates, rank=256).adapter


def run_fedavg(updates: Regenerating) -> LoraAdapter:
    return aggregate_fedavg(iter(updates))  # one pass over a one-shot iterator


@pytest.mark.parametrize(
    ("aggregate", "alive"),
    [(run_exact, CHUNK_RANK // 4 + 1), (run_fedavg, 2)],
    ids=["exact", "fedavg"],
)
@pytest.mark.parametrize("n", [10, 200])
def test_streaming_keeps_a_bounded_number_of_updates_alive(
    aggregate: Callable[[Regenerating], LoraAdapter], alive: int, n: int
) -> None:
    counter = AliveCounter()

    result = aggregate(Regenerating(n, counter))

    assert counter.peak <= alive and counter.tensors_peak <= alive * len(BIG.keys)
    assert counter.alive == 0 and counter.tensors_alive == 0
    assert result.extra["updates"] == str(n)
    if aggregate is run_exact:
        for module, want in big_mean(n).items():
            got = result.delta(module).double()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def matching(**changes: object) -> list[WeightedUpdate]:
    return [
        WeightedUpdate(random_adapter(2, seed=1), 1.0),
        WeightedUpdate(replace(random_adapter(2, seed=2), **changes), 1.0),  # type: ignore[arg-type]
    ]


def without_module(adapter: LoraAdapter, module: str) -> LoraAdapter:
    kept = {k: v for k, v in adapter.tensors.items() if not k.startswith(module + ".")}
    return replace(adapter, tensors=kept)


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "no updates to aggregate: the iterable was empty"),
        ([WeightedUpdate(random_adapter(2, seed=1), 0.0)], "weights of 1 updates sum to 0.0"),
        ([WeightedUpdate(random_adapter(2, seed=1), -1.0)], "update 0 has weight -1.0"),
        ([WeightedUpdate(random_adapter(2, seed=1), math.nan)], "update 0 has weight nan"),
        ([WeightedUpdate(random_adapter(2, seed=1), math.inf)], "update 0 has weight inf"),
        (matching(base_model_hash="other"), "update 1 has base_model_hash 'other'"),
        (matching(base_model_id="other/id"), "update 1 has base_model_id 'other/id'"),
        (
            [
                WeightedUpdate(random_adapter(2, seed=1), 1.0),
                WeightedUpdate(without_module(random_adapter(2, seed=2), "mid.to_k"), 1.0),
            ],
            "update 1 lacks module 'mid.to_k'",
        ),
        (
            [
                WeightedUpdate(random_adapter(2, seed=1), 1.0),
                WeightedUpdate(make_random(replace(SPEC, modules={"x": (2, 2)}), 2, 2, seed=2), 1),
            ],
            "update 1 lacks module 'down.to_q'",
        ),
    ],
    ids=["empty", "zero", "negative", "nan", "inf", "hash", "id", "module", "other-modules"],
)
def test_bad_inputs_are_refused_with_the_reason(
    updates: list[WeightedUpdate], message: str
) -> None:
    for aggregate in (aggregate_fedavg, lambda u: aggregate_exact(u, rank=4)):
        with pytest.raises(ValueError, match=message):
            aggregate(iter(updates))


def test_mismatched_shapes_are_refused() -> None:
    other = replace(SPEC, modules={**SPEC.modules, "mid.to_k": (8, 20)})
    updates = [
        WeightedUpdate(random_adapter(2, seed=1), 1.0),
        WeightedUpdate(make_random(other, 2, 2.0, seed=2), 1.0),
    ]

    with pytest.raises(ValueError, match=r"module 'mid.to_k' has \(out, in\) \(8, 20\)"):
        aggregate_exact(updates, rank=4)


def test_fedavg_refuses_mixed_ranks() -> None:
    updates = [WeightedUpdate(random_adapter(r, seed=r), 1.0) for r in (4, 4, 2)]

    with pytest.raises(ValueError, match="update 2 has rank 2, expected 4"):
        aggregate_fedavg(updates)
    with pytest.raises(ValueError, match="update 0 has rank 4, expected 8"):
        aggregate_fedavg(updates, rank=8)


CONV = LoraSpec(
    base_model_id="test/tiny",
    base_model_hash="hash-0",
    modules={"attn.to_q": (16, 24), "res.conv1": (8, 6, 3, 3), "attn.proj_in": (12, 12, 1, 1)},
    targets="full",
)


def conv_adapter(rank: int, *, seed: int, alpha: float | None = None) -> LoraAdapter:
    return make_random(CONV, rank, float(rank) if alpha is None else alpha, seed=seed, std=0.3)


def assert_conv_layout(adapter: LoraAdapter, rank: int) -> None:
    for module, shape in CONV.modules.items():
        a, b = adapter.pair(module)
        want_a = (rank, *shape[1:])
        want_b = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        assert (tuple(a.shape), tuple(b.shape)) == (want_a, want_b), module


def test_exact_on_conv_pairs_reproduces_the_weighted_mean_of_products() -> None:
    updates = [
        WeightedUpdate(conv_adapter(2, seed=1, alpha=4.0), 1.0),
        WeightedUpdate(conv_adapter(3, seed=2), 5.0),
        WeightedUpdate(conv_adapter(1, seed=3, alpha=8.0), 2.5),
    ]

    result = aggregate_exact(iter(updates), rank=6)

    assert_conv_layout(result.adapter, 6)
    assert_products(result.adapter, weighted_mean(updates, CONV))
    assert result.energy_kept == pytest.approx(1.0, abs=1e-6)
    assert result.adapter.targets == "full"


def test_exact_on_a_conv_pair_truncates_its_flattened_product() -> None:
    updates = [WeightedUpdate(conv_adapter(r, seed=r), 1.0) for r in (2, 3)]
    want = weighted_mean(updates, CONV)["res.conv1"]

    result = aggregate_exact(updates, rank=2)

    s = torch.linalg.svdvals(want.reshape(8, -1))
    error = (result.adapter.delta("res.conv1").double() - want).norm()
    assert error.item() == pytest.approx(s[2:].square().sum().sqrt().item(), abs=1e-5 * s[0].item())
    assert result.adapter.pair("res.conv1")[0].shape == (2, 6, 3, 3)


def test_fedavg_on_conv_pairs_averages_the_tensors_and_keeps_their_shapes() -> None:
    first, second = conv_adapter(3, seed=1), conv_adapter(3, seed=2)

    result = aggregate_fedavg([WeightedUpdate(first, 1.0), WeightedUpdate(second, 3.0)])

    assert_conv_layout(result, 3)
    for key, value in result.tensors.items():
        torch.testing.assert_close(value, (first.tensors[key] + 3 * second.tensors[key]) / 4)
    assert result.targets == "full"


def test_global_and_neighbour_blend_handle_conv_pairs() -> None:
    clusters = {c: conv_adapter(2, seed=i) for i, c in enumerate(CENTROIDS)}
    weights = neighbour_weights(CENTROIDS, temperature=0.5)

    overall = global_adapter([WeightedUpdate(a, 1.0) for a in clusters.values()], rank=6)
    blended = neighbour_blend(clusters, CENTROIDS, lam=0.3, temperature=0.5, rank=6)

    assert_products(
        overall.adapter, weighted_mean([WeightedUpdate(a, 1.0) for a in clusters.values()], CONV)
    )
    for c, result in blended.items():
        mix = [WeightedUpdate(clusters[j], 0.3 * p + 0.7 * (j == c)) for j, p in weights[c].items()]
        assert_conv_layout(result.adapter, 6)
        assert_products(result.adapter, weighted_mean(mix, CONV))


def test_conv_and_linear_pairs_of_one_module_do_not_mix() -> None:
    as_linear = replace(CONV, modules={**CONV.modules, "attn.proj_in": (12, 12)})
    updates = [
        WeightedUpdate(conv_adapter(2, seed=1), 1.0),
        WeightedUpdate(make_random(as_linear, 2, 2.0, seed=2), 1.0),
    ]

    with pytest.raises(
        ValueError,
        match=r"update 1 module 'attn.proj_in' has \(out, in\) \(12, 12\); "
        r"update 0 has \(12, 12, 1, 1\)",
    ):
        aggregate_exact(updates, rank=4)


def test_updates_for_another_preset_are_refused() -> None:
    updates = [
        WeightedUpdate(conv_adapter(2, seed=1), 1.0),
        WeightedUpdate(replace(conv_adapter(2, seed=2), targets="attention"), 1.0),
    ]

    for aggregate in (aggregate_fedavg, lambda u: aggregate_exact(u, rank=4)):
        with pytest.raises(
            ValueError, match="update 1 has targets 'attention'; update 0 has 'full'"
        ):
            aggregate(iter(updates))


def test_a_conv_pair_with_a_kernel_in_b_is_refused() -> None:
    adapter = conv_adapter(2, seed=1)
    tensors = {**adapter.tensors, "res.conv1" + B_SUFFIX: torch.zeros(8, 2, 3, 3)}

    with pytest.raises(ValueError, match=r"'res.conv1': A \(2, 6, 3, 3\) and B \(8, 2, 3, 3\)"):
        aggregate_fedavg([WeightedUpdate(replace(adapter, tensors=tensors), 1.0)])


def in_dtype(adapter: LoraAdapter, dtype: torch.dtype) -> LoraAdapter:
    return replace(adapter, tensors={k: v.to(dtype) for k, v in adapter.tensors.items()})


@pytest.mark.parametrize("resident_bytes", [4 << 30, 0])  # 0: every update in the file
def test_fedavg_sum_applies_weights_and_clips_settled_after_reading(resident_bytes: int) -> None:
    adapters = [
        in_dtype(conv_adapter(3, seed=1, alpha=6.0), torch.float16),  # weight 0: left out
        conv_adapter(3, seed=2, alpha=3.0),
        in_dtype(conv_adapter(3, seed=3, alpha=12.0), torch.bfloat16),
        conv_adapter(3, seed=4, alpha=3.0),
    ]
    weights, clips = [0.0, 2.0, 1.0, 3.0], [1.0, 1.0, 0.25, 1.0]
    fedavg = FedAvgSum(rank=3, options=SketchOptions(resident_bytes=resident_bytes))
    for adapter in adapters:
        fedavg.add(adapter)
    assert (fedavg.spilled_bytes > 0) == (resident_bytes == 0)

    result = fedavg.result(weights, clips)

    assert_conv_layout(result, 3)
    assert result.alpha == 3.0  # the scale of the first update with a weight (1), not 2
    for key, value in result.tensors.items():
        want = torch.zeros(value.shape, dtype=torch.float64)
        for adapter, weight, clip in zip(adapters[1:], weights[1:], clips[1:], strict=True):
            fold = adapter.scale if key.endswith(B_SUFFIX) else 1.0  # B in the result's scale
            want += adapter.tensors[key].double() * (weight * math.sqrt(clip) * fold / 6.0)
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7)
    assert fedavg.spilled_bytes == 0 and fedavg.count == 0  # the copies are released


def test_fedavg_sum_refuses_a_mixed_rank_and_bad_settlements() -> None:
    fedavg = FedAvgSum()
    for seed in (1, 2):
        fedavg.add(random_adapter(4, seed=seed))
    with pytest.raises(ValueError, match="update 2 has rank 2, expected 4"):
        fedavg.add(random_adapter(2, seed=3))

    for weights, clips, reason in (
        ([1.0], None, "1 weights for 2 updates"),
        ([1.0, 1.0], [1.0], "1 clip factors for 2 updates"),
        ([1.0, -1.0], None, "update 1 has weight -1.0"),
        ([1.0, 1.0], [1.0, 1.5], "update 1 has clip factor 1.5"),
        ([0.0, 0.0], None, "the weights of 2 updates sum to 0.0"),
    ):
        again = FedAvgSum()
        for seed in (1, 2):
            again.add(random_adapter(4, seed=seed))
        with pytest.raises(ValueError, match=reason):
            again.result(weights, clips)
    with pytest.raises(ValueError, match="no updates to aggregate"):
        FedAvgSum().result([])
