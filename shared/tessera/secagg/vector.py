"""What a device sums in secure mode: its weighted B factors as one fixed-point vector mod 2^32.

Every device of a cluster derives the same frozen A per module from the round's seed, so the
cluster's aggregate `sum(w_i B_i) / sum(w_i)` with that A is exactly the weighted mean of the
products `scale * B_i @ A` (aggregation becomes linear). A device's input is its B factors,
norm-clipped, multiplied by its weight w in [0, 1], each value clipped to [-range, range], with
w itself as the last value; values are rounded to multiples of 1 / `FixedPoint.scale` and taken
mod 2^32, where the pairwise masks cancel exactly. The scale leaves room for `count` inputs, so
the sum never wraps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from tessera.lora.adapter import (
    A_SUFFIX,
    B_SUFFIX,
    TARGET_PRESETS,
    LoraAdapter,
    LoraSpec,
    pair_shapes,
)
from tessera.lora.bounds import update_norm

MODULUS_BITS = 32
_HALF = 2 ** (MODULUS_BITS - 1)


def frozen_a(spec: LoraSpec, *, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The round's A per module from `seed`: uniform in +-1/sqrt(fan_in), peft's default init."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(spec.modules):
        a_shape, _ = pair_shapes(spec.modules[module], rank)
        fan_in = math.prod(a_shape[1:])
        uniform = torch.rand(a_shape, generator=generator, dtype=torch.float64)
        tensors[module] = ((uniform * 2 - 1) / math.sqrt(fan_in)).float()
    return tensors


def zero_b(spec: LoraSpec, *, rank: int) -> dict[str, torch.Tensor]:
    """B = 0 per module: with any A, an adapter that changes nothing (a first round's start)."""
    return {
        module: torch.zeros(pair_shapes(spec.modules[module], rank)[1])
        for module in sorted(spec.modules)
    }


def b_length(spec: LoraSpec, *, rank: int) -> int:
    """How many values the B factors of a rank-`rank` adapter hold."""
    return sum(math.prod(pair_shapes(shape, rank)[1]) for shape in spec.modules.values())


def vector_length(spec: LoraSpec, *, rank: int) -> int:
    """A secure input's length: every B value, then the weight."""
    return b_length(spec, rank=rank) + 1


def frozen_adapter(
    spec: LoraSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
) -> LoraAdapter:
    """The adapter of the frozen A and the given B per module."""
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(spec.modules):
        tensors[module + A_SUFFIX] = a[module]
        tensors[module + B_SUFFIX] = b[module]
    return LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=spec.base_model_id,
        base_model_hash=spec.base_model_hash,
        target_modules=TARGET_PRESETS[spec.targets],
        targets=spec.targets,
    )


def flatten_b(adapter: LoraAdapter, spec: LoraSpec) -> np.ndarray:
    """The adapter's B factors, module by module in sorted order, as one float64 vector."""
    parts = [
        adapter.tensors[module + B_SUFFIX].detach().to("cpu", torch.float64).reshape(-1).numpy()
        for module in sorted(spec.modules)
    ]
    return np.concatenate(parts)


def unflatten_b(values: np.ndarray, spec: LoraSpec, *, rank: int) -> dict[str, torch.Tensor]:
    """B per module from `flatten_b`'s layout (float32)."""
    tensors: dict[str, torch.Tensor] = {}
    start = 0
    for module in sorted(spec.modules):
        shape = pair_shapes(spec.modules[module], rank)[1]
        size = math.prod(shape)
        tensors[module] = torch.from_numpy(values[start : start + size].copy()).float().view(shape)
        start += size
    if start != values.shape[0]:
        raise ValueError(f"{values.shape[0]} values for B factors holding {start}")
    return tensors


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point values mod 2^32 with room for the sum of `count` inputs in [-range, range]."""

    value_range: float
    count: int

    @property
    def scale(self) -> int:
        """Steps per unit: the largest that keeps `count * range * scale` below 2^31."""
        scale = math.floor((_HALF - 1) / (self.count * self.value_range))
        if scale < 1:
            raise ValueError(
                f"value range {self.value_range} is too wide for {self.count} inputs mod 2^32"
            )
        return scale

    @property
    def step(self) -> float:
        """The rounding step: each value is off by at most half of it."""
        return 1.0 / self.scale

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Values clipped to the range, rounded, mod 2^32 (uint32)."""
        clipped = np.clip(values, -self.value_range, self.value_range)
        steps = np.rint(clipped * self.scale).astype(np.int64)
        return np.mod(steps, 2**MODULUS_BITS).astype(np.uint32)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float64 values of a sum of at most `count` encoded inputs."""
        signed = total.astype(np.int64)
        signed[signed >= _HALF] -= 2**MODULUS_BITS
        decoded: np.ndarray = signed / self.scale
        return decoded


@dataclass(frozen=True)
class DeviceInput:
    """A device's float input before encoding, and what clipping did to it."""

    values: np.ndarray
    norm: float  # ||scale * B @ A||_F before clipping
    clip_factor: float  # the factor B was scaled by (1: not clipped)


def device_input(
    adapter: LoraAdapter, spec: LoraSpec, *, weight: float, clip_norm: float | None
) -> DeviceInput:
    """B scaled so that `||scale * B @ A||_F <= clip_norm`, times `weight`, then the weight."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"a secure weight is in [0, 1], got {weight}")
    norm = update_norm(adapter)
    factor = 1.0
    if clip_norm is not None and norm > clip_norm:
        factor = clip_norm / norm
    values = np.append(flatten_b(adapter, spec) * (factor * weight), weight)
    return DeviceInput(values=values, norm=norm, clip_factor=factor)
