"""Bounding an update's influence: norms from Gram matrices, clipping, capped weights, fp16."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tessera.lora import LoraAdapter, LoraSpec, random_adapter
from tessera.lora.bounds import (
    FP16_MAX,
    ScaleRange,
    capped_weights,
    clip_bound,
    clip_update,
    publish_problem,
    squared_module_norms,
    staleness_discount,
    update_norm,
)

SPEC = LoraSpec(
    base_model_id="tiny",
    base_model_hash="0" * 64,
    modules={"down.to_q": (24, 16), "mid.conv1": (12, 8, 3, 3)},
    targets="full",
)


def adapter(seed: int = 0, *, alpha: float = 8.0) -> LoraAdapter:
    return random_adapter(SPEC, 4, alpha, seed=seed, std=0.3)


def dense_norm(lora: LoraAdapter) -> float:
    return math.sqrt(sum(float(lora.delta(m).double().square().sum()) for m in lora.modules))


def test_norms_from_gram_matrices_equal_the_dense_products() -> None:
    lora = adapter(alpha=6.0)

    squared = squared_module_norms(lora)

    for module in lora.modules:
        a, b = lora.flat_pair(module)
        want = float((b.double() @ a.double()).square().sum())
        assert squared[module] == pytest.approx(want, rel=1e-9)
    assert update_norm(lora) == pytest.approx(dense_norm(lora), rel=1e-6)


def test_a_norm_too_large_for_float64_is_infinite() -> None:
    lora = adapter()
    full = {key: torch.full_like(value, 1e30) for key, value in lora.tensors.items()}
    huge = dataclasses.replace(lora, tensors=full, alpha=1e308)

    assert update_norm(huge) == math.inf


def test_clipping_scales_the_product_to_the_bound_evenly_through_a_and_b() -> None:
    lora = adapter(1)
    norm = update_norm(lora)

    clipped, factor = clip_update(lora, norm=norm, bound=norm / 4)
    same, one = clip_update(lora, norm=norm, bound=norm * 2)

    assert factor == pytest.approx(0.25)
    assert dense_norm(clipped) == pytest.approx(norm / 4, rel=1e-5)
    for key, value in clipped.tensors.items():
        assert torch.allclose(value, lora.tensors[key] * 0.5)
    assert same is lora and one == 1.0


def test_a_huge_update_clips_to_a_finite_one() -> None:
    lora = adapter(2)
    huge = dataclasses.replace(
        lora, tensors={k: torch.full_like(v, 3e38) for k, v in lora.tensors.items()}
    )
    norm = update_norm(huge)

    clipped, _ = clip_update(huge, norm=norm, bound=1.0)

    assert math.isfinite(norm)
    assert dense_norm(clipped) == pytest.approx(1.0, rel=1e-4)


def test_the_bound_is_fixed_or_a_multiple_of_the_median() -> None:
    norms = [1.0, 2.0, 3.0, 1000.0]

    assert clip_bound(norms, mode="adaptive", norm=None, multiplier=2.0) == 5.0
    assert clip_bound(norms, mode="fixed", norm=7.0, multiplier=2.0) == 7.0
    with pytest.raises(ValueError, match="fixed clip needs a norm"):
        clip_bound(norms, mode="fixed", norm=None, multiplier=2.0)


def test_weights_are_capped_at_a_multiple_of_the_median_or_equal() -> None:
    samples = [8, 8, 8, 16, 1_000_000]

    assert capped_weights(samples, weighting="samples", max_ratio=2.0) == [8, 8, 8, 16, 16]
    assert capped_weights(samples, weighting="equal", max_ratio=2.0) == [1.0] * 5


def test_a_stale_update_weighs_one_over_its_versions_behind_plus_one_to_the_exponent() -> None:
    assert staleness_discount(0, exponent=1.0) == 1.0
    assert staleness_discount(3, exponent=1.0) == 0.25
    assert staleness_discount(3, exponent=0.5) == 0.5
    assert staleness_discount(3, exponent=0.0) == 1.0
    with pytest.raises(ValueError, match="versions behind, found -1"):
        staleness_discount(-1, exponent=1.0)


def test_only_finite_fp16_safe_adapters_are_publishable() -> None:
    lora = adapter(3)
    key = next(iter(lora.tensors))
    overflow = {**lora.tensors, key: lora.tensors[key] * 0 + 2 * FP16_MAX}
    nan = {**lora.tensors, key: lora.tensors[key] * math.nan}

    assert publish_problem(lora) is None
    assert "beyond the fp16 range" in (
        publish_problem(dataclasses.replace(lora, tensors=overflow)) or ""
    )
    assert "non-finite" in (publish_problem(dataclasses.replace(lora, tensors=nan)) or "")
    assert "alpha" in (publish_problem(dataclasses.replace(lora, alpha=1e30)) or "")


def test_the_scale_range_names_no_value() -> None:
    scales = ScaleRange(0.001, 16.0)

    assert scales.problem(adapter(alpha=4.0)) is None
    problem = scales.problem(adapter(alpha=1e30)) or ""
    assert "outside [0.001, 16]" in problem and "1e+30" not in problem
