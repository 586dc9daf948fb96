"""How much one update may count: its product's norm, clipping, capped weights, fp16 safety.

Pure functions, applied to updates before they reach the aggregation maths (`aggregate.py`), so
that whichever rule aggregates, no single device decides what a cluster becomes. The norm of an
update is that of its whole product, `||scale * B @ A||_F` summed over modules, computed from the
r x r Gram matrices (`||B A||_F^2 = trace((B^T B)(A A^T))`), never from the dense product.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from tessera.lora.adapter import LoraAdapter

FP16_MAX = 65504.0
Weighting = Literal["samples", "equal"]


@dataclass(frozen=True)
class ScaleRange:
    """The LoRA scales (`alpha / rank`) the server accepts."""

    low: float
    high: float

    def problem(self, adapter: LoraAdapter) -> str | None:
        """Why the adapter's scale is refused (without its value), or None."""
        if self.low <= adapter.scale <= self.high:
            return None
        return f"its LoRA scale alpha / rank is outside [{self.low:g}, {self.high:g}]"


def squared_module_norms(adapter: LoraAdapter) -> dict[str, float]:
    """`||B @ A||_F^2` of each module (scale left out), in float64 from the Gram matrices."""
    norms: dict[str, float] = {}
    for module in adapter.modules:
        a, b = (t.detach().to("cpu", torch.float64) for t in adapter.flat_pair(module))
        norms[module] = max(0.0, float(((b.T @ b) * (a @ a.T)).sum()))
    return norms


def update_norm(adapter: LoraAdapter) -> float:
    """`||scale * B @ A||_F` over all modules at once; inf or nan when it cannot be computed."""
    total = math.fsum(squared_module_norms(adapter).values())
    return abs(adapter.scale) * math.sqrt(total) if math.isfinite(total) else math.inf


def clip_update(adapter: LoraAdapter, *, norm: float, bound: float) -> tuple[LoraAdapter, float]:
    """The adapter with its product scaled to at most `bound`, and the factor used.

    The factor is split evenly, its square root on A and on B: on B alone, a factor of 1e-78
    (an update full of 3e38) would underflow float32 and lose the product.
    """
    if not (math.isfinite(norm) and math.isfinite(bound)) or bound < 0:
        raise ValueError(f"need a finite norm and bound >= 0, got {norm} and {bound}")
    if norm <= bound:
        return adapter, 1.0
    factor = bound / norm
    return scaled_update(adapter, factor), factor


def scaled_update(adapter: LoraAdapter, factor: float) -> LoraAdapter:
    """The adapter with its product times `factor` (in [0, 1]): A and B each times its square
    root, in float64 and back to their dtype (see `clip_update`); the same adapter at 1."""
    if factor == 1.0:
        return adapter
    root = math.sqrt(factor)
    tensors = {
        key: (value.double() * root).to(value.dtype) for key, value in adapter.tensors.items()
    }
    return replace(adapter, tensors=tensors)


def clip_bound(
    norms: Sequence[float],
    *,
    mode: Literal["adaptive", "fixed"],
    norm: float | None,
    multiplier: float,
) -> float:
    """The group's bound: `norm` when fixed, else `multiplier` times the median of `norms`."""
    if mode == "fixed":
        if norm is None:
            raise ValueError("a fixed clip needs a norm")
        return norm
    if not norms:
        raise ValueError("an adaptive clip needs at least one norm")
    return multiplier * statistics.median(norms)


def capped_weights(
    samples: Sequence[int], *, weighting: Weighting, max_ratio: float
) -> list[float]:
    """Aggregation weights: equal, or sample counts capped at `max_ratio` times their median."""
    if weighting == "equal":
        return [1.0] * len(samples)
    if not samples:
        return []
    cap = max_ratio * statistics.median(samples)
    return [float(min(n, cap)) for n in samples]


def staleness_discount(staleness: int, *, exponent: float) -> float:
    """The factor on the weight of an update trained `staleness` versions behind the newest:
    (1 + staleness) ** -exponent, FedBuff's polynomial discount (1 when fresh or off)."""
    if staleness < 0:
        raise ValueError(f"staleness counts versions behind, found {staleness}")
    return float((1 + staleness) ** -exponent)


def publish_problem(adapter: LoraAdapter) -> str | None:
    """Why an aggregate must not be published (non-finite, or beyond fp16's range), or None."""
    if not (math.isfinite(adapter.alpha) and 0 < adapter.alpha <= FP16_MAX):
        return "its alpha is not a finite fp16 value"
    for key in sorted(adapter.tensors):
        tensor = adapter.tensors[key]
        if not bool(torch.isfinite(tensor).all()):
            return f"tensor {key!r} has non-finite values"
        if tensor.numel() and float(tensor.abs().max()) > FP16_MAX:
            return f"tensor {key!r} has values beyond the fp16 range (|x| > {FP16_MAX:g})"
    return None
