"""Robust selection on sketches of LoRA products: distances kept, outliers found."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tessera.lora import LoraAdapter, LoraSpec, random_adapter
from tessera.lora.robust import Sketcher, multi_krum, norm_outliers, trimmed_by_median

SPEC = LoraSpec(
    base_model_id="tiny",
    base_model_hash="0" * 64,
    modules={f"block{i}.to_q": (48, 32) for i in range(12)} | {"mid.conv1": (16, 8, 3, 3)},
    targets="full",
)


def adapter(seed: int, *, std: float = 0.3) -> LoraAdapter:
    return random_adapter(SPEC, 4, 4.0, seed=seed, std=std)


def product_distance(x: LoraAdapter, y: LoraAdapter) -> float:
    return math.sqrt(
        sum(float((x.delta(m).double() - y.delta(m).double()).square().sum()) for m in x.modules)
    )


def test_sketch_distances_track_product_distances() -> None:
    sketcher = Sketcher(seed=3)
    updates = [adapter(seed) for seed in range(6)]
    sketches = [sketcher.sketch(u) for u in updates]

    ratios = [
        float((sketches[i] - sketches[j]).norm()) / product_distance(updates[i], updates[j])
        for i in range(6)
        for j in range(i + 1, 6)
    ]

    assert sketches[0].numel() == len(SPEC.modules) * 8 * 8
    assert min(ratios) > 0.6 and max(ratios) < 1.4, ratios


def test_the_same_seed_gives_the_same_sketch() -> None:
    update = adapter(1)

    assert torch.equal(Sketcher(seed=5).sketch(update), Sketcher(seed=5).sketch(update))


def alike(count: int) -> list[LoraAdapter]:
    """`count` honest updates: one shared direction, a little noise each."""
    common = adapter(100)
    return [
        dataclasses.replace(
            common,
            tensors={
                k: v + adapter(200 + i, std=0.03).tensors[k] for k, v in common.tensors.items()
            },
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("attack", ["scaled", "flipped", "other"])
def test_multi_krum_and_trimming_drop_the_attacker(attack: str) -> None:
    honest = alike(7)
    base = honest[0]
    attacker = {
        "scaled": dataclasses.replace(base, alpha=base.alpha * 3),
        "flipped": dataclasses.replace(base, alpha=-base.alpha),
        "other": adapter(999),
    }[attack]
    sketcher = Sketcher(seed=0)
    sketches = torch.stack([sketcher.sketch(u) for u in [*honest[:3], attacker, *honest[3:]]])

    assert multi_krum(sketches, f=1) == [0, 1, 2, 4, 5, 6, 7]
    assert trimmed_by_median(sketches, trim=0.125) == [0, 1, 2, 4, 5, 6, 7]


def test_the_rules_keep_everyone_when_there_is_nothing_to_drop() -> None:
    sketches = torch.randn(3, 5, dtype=torch.float64)

    assert multi_krum(sketches, f=0) == [0, 1, 2]
    assert multi_krum(sketches, f=5) in ([0], [1], [2])  # keeps at least one
    assert trimmed_by_median(sketches, trim=0.2) == [0, 1, 2]  # floor(0.6) = 0 dropped
    with pytest.raises(ValueError, match="trim"):
        trimmed_by_median(sketches, trim=0.5)


def test_the_norm_rule_drops_only_norms_far_above_the_median() -> None:
    norms = [1.0, 1.3, 0.8, 1000.0, 1.1, 3.7, 0.9, 3.5]  # median 1.2: the bound is 3.6

    kept = norm_outliers(norms, ratio=3.0)

    assert kept == [0, 1, 2, 4, 6, 7]
    assert norm_outliers([], ratio=3.0) == []
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        norm_outliers(norms, ratio=0.5)
