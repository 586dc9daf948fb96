"""Applying a weighted mix of adapters to a shared UNet without changing it for anyone else.

A *mix* is the list `[(adapter, weight), ...]`. `merge_mix` turns it into merged weights
`W + sum_i weight_i * scale_i * B_i @ A_i` for each target layer, once per mix. `install_mixing`
makes the UNet's target `nn.Linear` layers read the merged weight of the mix active in the
*current context* (a `ContextVar`: per thread and per asyncio task), so two jobs on two threads
with different mixes share one UNet and never see each other's adapters. A generation step
then costs exactly what the base model costs (one matmul per layer, no extra LoRA branch).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from tessera.lora.adapter import LoraAdapter, LoraSpec

if TYPE_CHECKING:
    from collections.abc import Mapping

Mix = Sequence[tuple[LoraAdapter, float]]


@dataclass(frozen=True)
class MergedMix:
    """Merged target-layer weights for one mix; `label` says what it holds, for logs."""

    weights: Mapping[str, torch.Tensor]
    label: str = "base"
    nbytes: int = field(default=0)


_ACTIVE: ContextVar[MergedMix | None] = ContextVar("tessera_active_mix", default=None)


class MixedLinear(torch.nn.Linear):
    """A target layer: uses the active mix's merged weight when it has one, else its own."""

    mix_key: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = _ACTIVE.get()
        weight = None if mix is None else mix.weights.get(self.mix_key)
        return torch.nn.functional.linear(x, self.weight if weight is None else weight, self.bias)


def install_mixing(unet: torch.nn.Module, spec: LoraSpec) -> None:
    """Make every target layer of `unet` a MixedLinear (idempotent; parameters untouched).

    The class is swapped in place rather than the module replaced, so state-dict keys, the
    weights fingerprint and `save_pretrained` are unchanged.
    """
    for name in spec.modules:
        module = unet.get_submodule(name)
        if type(module) is torch.nn.Linear:
            module.__class__ = MixedLinear
            cast(MixedLinear, module).mix_key = name
        elif not isinstance(module, MixedLinear):
            raise TypeError(f"{name}: expected nn.Linear, found {type(module).__name__}")


def check_compatible(adapter: LoraAdapter, spec: LoraSpec) -> None:
    """Refuse an adapter made for another base model or with modules this base lacks."""
    if adapter.base_model_hash != spec.base_model_hash:
        raise ValueError(
            f"adapter is for base {adapter.base_model_id} ({adapter.base_model_hash[:12]}), "
            f"this base is {spec.base_model_id} ({spec.base_model_hash[:12]})"
        )
    unknown = sorted(set(adapter.modules) - set(spec.modules))
    if unknown:
        raise ValueError(f"adapter module {unknown[0]} is not a target layer of this base")


def check_weights(mix: Mix) -> None:
    """Weights must be finite and non-negative."""
    for index, (_, weight) in enumerate(mix):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"adapter {index}: weight must be finite and >= 0, found {weight}")


def merge_mix(unet: torch.nn.Module, spec: LoraSpec, mix: Mix, label: str = "") -> MergedMix:
    """Merged weights of the mix for every layer any of its adapters touches."""
    check_weights(mix)
    for adapter, _ in mix:
        check_compatible(adapter, spec)
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for adapter, weight in mix:
            if weight == 0:
                continue
            for module in adapter.modules:
                if module not in merged:
                    layer = cast(torch.nn.Linear, unet.get_submodule(module))
                    merged[module] = layer.weight.detach().clone()
                target = merged[module]
                delta = adapter.delta(module).to(target.device, target.dtype)
                target.add_(delta, alpha=float(weight))
    nbytes = sum(t.numel() * t.element_size() for t in merged.values())
    return MergedMix(weights=merged, label=label or describe_mix(mix), nbytes=nbytes)


def describe_mix(mix: Mix) -> str:
    """A short label: each adapter's `adapter_id` (else its position) and its weight."""
    parts = [f"{a.extra.get('adapter_id', f'#{i}')}x{w:g}" for i, (a, w) in enumerate(mix)]
    return "+".join(parts) or "base"


@contextlib.contextmanager
def use_mix(mix: MergedMix | None) -> Iterator[None]:
    """Within the block, this thread's (or task's) forward passes use `mix` (None: the base)."""
    token = _ACTIVE.set(mix)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mix() -> MergedMix | None:
    """The mix in force in the current context."""
    return _ACTIVE.get()
