"""The Gaussian mechanism on a cluster's sum of clipped products (`aggregate_private`)."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.lora.adapter import LoraAdapter, LoraSpec, random_adapter
from tessera.lora.aggregate import PrivateSum, WeightedUpdate, aggregate_private
from tessera.lora.bounds import clip_update, update_norm

SPEC = LoraSpec(
    base_model_id="test/tiny",
    base_model_hash="hash-0",
    modules={"down.to_q": (64, 96), "up.to_k": (48, 80)},
)
RANK = 64  # at least every module's smaller side: the truncation keeps everything
CLIP = 2.0


def updates(count: int) -> list[LoraAdapter]:
    return [random_adapter(SPEC, 4, 4.0, seed=i, std=0.3) for i in range(count)]


def private(adapters: list[LoraAdapter], *, multiplier: float, count: int, seed: int = 7):
    return aggregate_private(
        [WeightedUpdate(a, 1.0) for a in adapters],
        rank=RANK,
        clip_norm=CLIP,
        noise_multiplier=multiplier,
        count=count,
        generator=torch.Generator().manual_seed(seed),
    )


def clipped_sum(adapters: list[LoraAdapter]) -> dict[str, torch.Tensor]:
    sums = {m: torch.zeros(shape, dtype=torch.float64) for m, shape in SPEC.modules.items()}
    for adapter in adapters:
        clipped, _ = clip_update(adapter, norm=update_norm(adapter), bound=CLIP)
        for module in sums:
            sums[module] += clipped.delta(module).double()
    return sums


def test_noise_of_the_right_std_is_added_to_the_sum() -> None:
    adapters = updates(3)
    assert all(update_norm(a) > CLIP for a in adapters)  # each one is clipped

    result = private(adapters, multiplier=1.5, count=4)  # a fourth update was excluded

    residual = torch.cat(
        [
            (result.adapter.delta(m).double() * 4 - s).reshape(-1)
            for m, s in clipped_sum(adapters).items()
        ]
    )
    # 10,224 coordinates: the sample std's relative error is about 0.7%; 3% is 4 sigma.
    assert float(residual.std()) == pytest.approx(1.5 * CLIP, rel=0.03)
    assert abs(float(residual.mean())) < 4 * 1.5 * CLIP / math.sqrt(residual.numel())
    assert result.adapter.extra["method"] == "private"


def test_without_noise_it_is_the_mean_of_the_clipped_products() -> None:
    adapters = updates(3)

    noiseless = private(adapters, multiplier=0.0, count=3)

    for module, summed in clipped_sum(adapters).items():
        error = (noiseless.adapter.delta(module).double() - summed / 3).abs().max()
        assert float(error) < 1e-5 * float(summed.abs().max())


def test_one_seed_gives_one_noise_and_another_seed_another() -> None:
    adapters = updates(2)

    first, again = (private(adapters, multiplier=1.0, count=2, seed=3) for _ in range(2))
    other = private(adapters, multiplier=1.0, count=2, seed=4)

    module = "down.to_q"
    assert torch.equal(first.adapter.delta(module), again.adapter.delta(module))
    assert not torch.equal(first.adapter.delta(module), other.adapter.delta(module))


def test_weights_other_than_one_and_a_short_count_are_refused() -> None:
    adapters = updates(2)
    with pytest.raises(ValueError, match="weighs each 1"):
        aggregate_private(
            [WeightedUpdate(adapters[0], 16.0)],
            rank=RANK,
            clip_norm=CLIP,
            noise_multiplier=1.0,
            count=1,
            generator=torch.Generator(),
        )
    with pytest.raises(ValueError, match="count 1 is below the 2 updates"):
        private(adapters, multiplier=1.0, count=1)


def test_one_update_at_a_time_with_known_norms_is_the_same_mechanism() -> None:
    adapters = updates(3)
    private_sum = PrivateSum(rank=RANK, clip_norm=CLIP, noise_multiplier=1.0)
    for adapter in adapters:
        private_sum.add(adapter, norm=update_norm(adapter))  # as the worker's survey gives it

    result = private_sum.result(count=4, generator=torch.Generator().manual_seed(7))

    want = private(adapters, multiplier=1.0, count=4)
    for module in SPEC.modules:
        assert torch.equal(result.adapter.delta(module), want.adapter.delta(module))
    with pytest.raises(ValueError, match="no updates to aggregate"):
        PrivateSum(rank=RANK, clip_norm=CLIP, noise_multiplier=1.0).result(
            count=1, generator=torch.Generator()
        )
