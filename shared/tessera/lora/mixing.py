"""Applying a weighted mix of adapters to a shared UNet without changing it for anyone else.

A *mix* is the list `[(adapter, weight), ...]`. `install_mixing` makes the UNet's target
`nn.Linear` and `nn.Conv2d` layers read the mix active in the *current context* (a
`ContextVar`: per thread and per asyncio task), so two jobs on two threads with different mixes
share one UNet and never see each other's adapters.

The default is *unmerged* (`unmerged_mix`): per target layer the mix holds its adapters' pairs
(A, B, weight * scale), already on the layer's device and dtype, and the layer computes
`base(x) + sum_i c_i * B_i(A_i(x))`. A mix then costs no memory of its own (it references the
adapters' tensors) and a layer no adapter of the mix touches costs exactly the base.
`merge_mix` builds merged weights `W + sum_i c_i * B_i @ A_i` instead: one matmul per layer, at
the price of a copy of every weight the mix touches (357 MiB for SD-1.5's attention), so it is
for a hot mix within a budget, never the default.

`per_sample_mix` serves each sample of a batch with its own mix, as multi-LoRA LLM servers do:
per target layer it gathers each sample's pairs once per batch (not per step), A stacked and
`coeff * B` stacked, zero-padded to the largest summed rank of any sample at that layer, and the
layer adds each sample's `B_s (A_s x_s)` into its own output: a Linear pair is two batched
matmuls, a conv pair one grouped convolution (one group per sample) then a batched 1x1 product.
Where a layer's pairs cost much against the layer itself (a small model: rank 16 on 32 channels
doubles a Linear's work), each sample instead gets its merged weight `W + B_s A_s` within a byte
budget, and the layer runs once per row with no LoRA products (a batched matmul, a grouped
convolution).
Rows of the UNet batch map to samples cyclically (row j is sample j mod S), which is how
classifier-free guidance lays out its doubled batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch.nn import functional

from tessera.lora.adapter import A_SUFFIX, B_SUFFIX, LoraAdapter, LoraSpec

Mix = Sequence[tuple[LoraAdapter, float]]


@dataclass(frozen=True)
class LoraTerm:
    """One adapter's share of one layer: `coeff * B(A(x))`, A and B on the layer's device."""

    a: torch.Tensor  # [r, in] or [r, in, kh, kw]
    b: torch.Tensor  # [out, r] or [out, r, 1, 1]
    coeff: float  # the mix weight times the adapter's alpha / rank


@dataclass(frozen=True)
class SampleTerms:
    """One layer's pairs for each sample of a batch, laid out for the products the layer runs:
    Linear `a` [S, in, R] and `b` [S, R, out] (A and B transposed); conv `a` [S * R, in, kh, kw]
    (the groups of one convolution) and `b` [S, out, R]. Each sample's coefficients are folded
    into its B, R is the largest summed rank of any sample (zero-padded)."""

    a: torch.Tensor
    b: torch.Tensor
    samples: int
    rank: int

    def add_linear(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus each row's `B_s (A_s x)`, for x [rows, ..., in]: per repeat of the batch,
        one batched product down to the rank and one batched product added into `out`."""
        k = _repeats(x, self.samples)
        flat = x.reshape(k, self.samples, -1, x.shape[-1])  # [k, S, tokens, in]
        if not out.is_contiguous():
            out = out.contiguous()
        grid = out.view(k, self.samples, -1, out.shape[-1])  # [k, S, tokens, out]
        for repeat in range(k):
            grid[repeat].baddbmm_(torch.bmm(flat[repeat], self.a), self.b)
        return out

    def add_conv(self, layer: torch.nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus each row's `B_s (A_s * x)`, A with the layer's stride, padding and
        dilation: the samples are the groups of one convolution, the repeats of the batch its
        batch; B is a batched product added into `out`."""
        k, samples = _repeats(x, self.samples), self.samples
        x, padding = _padded(layer, x)
        low = functional.conv2d(
            x.reshape(k, samples * x.shape[1], *x.shape[2:]),
            self.a,  # group s is sample s
            None,
            layer.stride,
            padding,
            layer.dilation,
            groups=samples,
        )  # [k, S * R, h, w]
        if not out.is_contiguous():
            out = out.contiguous()
        grid = out.view(k, samples, out.shape[1], -1)  # [k, S, out, hw]
        low = low.reshape(k, samples, self.rank, -1)
        for repeat in range(k):
            grid[repeat].baddbmm_(self.b, low[repeat])
        return out


@dataclass(frozen=True)
class SampleWeights:
    """One layer's merged weight for each sample of a batch, `W + sum_i c_i B_i A_i`: Linear
    `weight` [S, in, out] (transposed) and `bias` [out]; conv `weight` [S * out, in, kh, kw]
    and `bias` [S * out] (the groups of one convolution). The layer then runs once per row,
    with no LoRA products at all: cheaper whenever the pairs' rank is not small against the
    layer's width, at the price of a weight copy per sample."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    samples: int

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Each row through its sample's weight, for x [rows, ..., in]."""
        k = _repeats(x, self.samples)
        flat = x.reshape(k, self.samples, -1, x.shape[-1])  # [k, S, tokens, in]
        out = x.new_empty((k, self.samples, flat.shape[2], self.weight.shape[-1]))
        for repeat in range(k):
            if self.bias is None:
                torch.bmm(flat[repeat], self.weight, out=out[repeat])
            else:
                torch.baddbmm(self.bias, flat[repeat], self.weight, out=out[repeat])
        return out.view(*x.shape[:-1], -1)

    def conv(self, layer: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """Each row through its sample's weight: one grouped convolution per repeat of the batch."""
        k = _repeats(x, self.samples)
        x, padding = _padded(layer, x)
        out = functional.conv2d(
            x.reshape(k, self.samples * x.shape[1], *x.shape[2:]),
            self.weight,
            self.bias,
            layer.stride,
            padding,
            layer.dilation,
            groups=self.samples,
        )  # [k, S * out, h, w]
        return out.reshape(k * self.samples, -1, *out.shape[2:])


def _repeats(x: torch.Tensor, samples: int) -> int:
    """How many times the batch `x` repeats its samples (row j is sample j mod S)."""
    rows = int(x.shape[0])
    if rows % samples:
        raise ValueError(f"a batch of {rows} rows cannot carry {samples} per-sample mixes")
    return rows // samples


def _padded(layer: torch.nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """`x` and the padding to convolve it with, the layer's padding mode applied."""
    if layer.padding_mode != "zeros":
        x = functional.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return x, 0
    return x, layer.padding


@dataclass(frozen=True)
class ActiveMix:
    """What the target layers read in a context: per layer, LoRA terms or a merged weight, or
    (`per_sample_mix`) each sample's own pairs or own merged weight.

    `nbytes` counts the tensors this mix owns (merged weights, casts it had to make, stacked
    per-sample pairs), not the adapters' tensors it only references; `label` says what it
    holds, for logs; `samples` is the batch size a per-sample mix was built for (0: any).
    """

    terms: Mapping[str, tuple[LoraTerm, ...]] = field(default_factory=dict)
    merged: Mapping[str, torch.Tensor] = field(default_factory=dict)
    label: str = "base"
    nbytes: int = 0
    per_sample: Mapping[str, SampleTerms | SampleWeights] = field(default_factory=dict)
    samples: int = 0

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """The merged weights (empty for an unmerged mix)."""
        return self.merged


_ACTIVE: ContextVar[ActiveMix | None] = ContextVar("tessera_active_mix", default=None)


class MixedLinear(torch.nn.Linear):
    """A target Linear: its own output plus the active mix's terms, or the mix's merged weight."""

    mix_key: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = _ACTIVE.get()
        if mix is None:
            return functional.linear(x, self.weight, self.bias)
        stacked = mix.per_sample.get(self.mix_key)
        if isinstance(stacked, SampleWeights):
            return stacked.linear(x)
        merged = mix.merged.get(self.mix_key)
        if merged is not None:
            return functional.linear(x, merged, self.bias)
        out = functional.linear(x, self.weight, self.bias)
        for term in mix.terms.get(self.mix_key, ()):
            out = out + functional.linear(functional.linear(x, term.a) * term.coeff, term.b)
        if stacked is not None:
            out = stacked.add_linear(x, out)
        return out


class MixedConv2d(torch.nn.Conv2d):
    """A target Conv2d: A as a conv with the layer's stride, padding and dilation, B as 1x1."""

    mix_key: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = _ACTIVE.get()
        if mix is None:
            return self._conv_forward(x, self.weight, self.bias)
        stacked = mix.per_sample.get(self.mix_key)
        if isinstance(stacked, SampleWeights):
            return stacked.conv(self, x)
        merged = mix.merged.get(self.mix_key)
        if merged is not None:
            return self._conv_forward(x, merged, self.bias)
        out = self._conv_forward(x, self.weight, self.bias)
        for term in mix.terms.get(self.mix_key, ()):
            # _conv_forward applies this layer's padding mode too; lora_spec admits groups == 1.
            out = out + functional.conv2d(self._conv_forward(x, term.a, None) * term.coeff, term.b)
        if stacked is not None:
            out = stacked.add_conv(self, x, out)
        return out


_MIXED: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.Linear: MixedLinear,
    torch.nn.Conv2d: MixedConv2d,
}


def install_mixing(unet: torch.nn.Module, spec: LoraSpec) -> None:
    """Make every target layer of `unet` mix-aware (idempotent; parameters untouched).

    The class is swapped in place rather than the module replaced, so state-dict keys, the
    weights fingerprint and `save_pretrained` are unchanged.
    """
    for name in spec.modules:
        module = unet.get_submodule(name)
        mixed = _MIXED.get(type(module))
        if mixed is not None:
            module.__class__ = mixed
            cast(MixedLinear, module).mix_key = name
        elif type(module) not in _MIXED.values():
            raise TypeError(f"{name}: expected nn.Linear or nn.Conv2d, found {type(module)}")


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


def place_adapter(unet: torch.nn.Module, adapter: LoraAdapter) -> LoraAdapter:
    """The adapter with each pair on its target layer's device and dtype (a cache does this
    once per adapter; tensors already there are kept, not copied)."""
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for module, a, b in adapter.pairs():
            weight = cast(torch.Tensor, unet.get_submodule(module).weight)
            tensors[module + A_SUFFIX] = a.to(weight.device, weight.dtype)
            tensors[module + B_SUFFIX] = b.to(weight.device, weight.dtype)
    placed = replace(adapter, tensors=tensors)
    _ = placed.modules  # sorted here, once, rather than on the first switch that uses it
    return placed


def tensor_bytes(tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' values (each tensor counted once)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    unique = {id(t): t for t in values}
    return sum(t.numel() * t.element_size() for t in unique.values())


def unmerged_mix(
    unet: torch.nn.Module, spec: LoraSpec, mix: Mix, label: str = "", *, placed: bool = False
) -> ActiveMix:
    """The mix as LoRA terms per target layer; casts an adapter not yet on the model's device
    and dtype (then `nbytes` counts the casts), else only references its tensors.

    `placed=True` says every adapter already went through `place_adapter` (a cache's adapters
    do, once, when loaded): the mix then only references them, which keeps a switch between
    cached mixes at microseconds however large the UNet.
    """
    _check(spec, mix)
    terms: dict[str, list[LoraTerm]] = {}
    owned: list[torch.Tensor] = []
    for adapter, weight in mix:
        if weight == 0:
            continue
        if not placed:
            adapter_on_device = place_adapter(unet, adapter)
            owned += [
                t for k, t in adapter_on_device.tensors.items() if t is not adapter.tensors[k]
            ]
            adapter = adapter_on_device
        for module, a, b in adapter.pairs():
            terms.setdefault(module, []).append(LoraTerm(a, b, float(weight) * adapter.scale))
    return ActiveMix(
        terms={module: tuple(pairs) for module, pairs in terms.items()},
        label=label or describe_mix(mix),
        nbytes=tensor_bytes(owned),
    )


def merge_mix(unet: torch.nn.Module, spec: LoraSpec, mix: Mix, label: str = "") -> ActiveMix:
    """Merged weights of the mix for every layer any of its adapters touches (a full copy of
    each such weight: for a hot mix within a budget; `unmerged_mix` is the default)."""
    _check(spec, mix)
    touched = sorted({module for adapter, weight in mix if weight for module in adapter.modules})
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for module in touched:
            weight = cast(torch.Tensor, unet.get_submodule(module).weight)
            total = weight.detach().float()  # summed in float32, cast once (fp16/bf16 models)
            for adapter, share in mix:
                if share and module + A_SUFFIX in adapter.tensors:
                    total = total + adapter.delta(module).to(weight.device) * float(share)
            merged[module] = total.to(weight.dtype)
    return ActiveMix(merged=merged, label=label or describe_mix(mix), nbytes=tensor_bytes(merged))


def per_sample_mix(
    mixes: Sequence[ActiveMix | None],
    label: str = "",
    *,
    unet: torch.nn.Module | None = None,
    merge_bytes: int = 0,
) -> ActiveMix:
    """One mix per sample of a batch, from each sample's unmerged mix (None: the base alone).

    Per layer any of them touches, each sample's terms are gathered once per batch: A stacked,
    and B scaled by its coefficient and stacked, zero-padded to the largest summed rank, on the
    layer's device and dtype. With `unet` and `merge_bytes`, the layers whose pairs cost most
    against the layer itself instead get each sample's merged weight, while those copies fit
    in `merge_bytes` (for a small model, every layer: the batch then runs at the base's cost).
    The batch's tensors cost `nbytes` for as long as it runs; the adapters are not copied.
    """
    if not mixes:
        raise ValueError("a per-sample mix needs at least one sample")
    if merge_bytes and unet is None:
        raise ValueError("merging per sample needs the unet whose weights it merges")
    for index, mix in enumerate(mixes):
        if mix is not None and (mix.merged or mix.per_sample):
            raise ValueError(f"sample {index}: a per-sample mix is built from unmerged mixes")
    modules = sorted({module for mix in mixes if mix is not None for module in mix.terms})
    terms = {
        module: [() if m is None else m.terms.get(module, ()) for m in mixes] for module in modules
    }
    merging = _to_merge(unet, terms, merge_bytes) if unet is not None and merge_bytes else set()
    stacked: dict[str, SampleTerms | SampleWeights] = {}
    with torch.no_grad():
        for module in modules:
            pairs = _stack(module, terms[module])
            if module in merging:
                layer = cast(torch.nn.Module, unet).get_submodule(module)
                stacked[module] = _merge_each(layer, pairs)
            else:
                stacked[module] = pairs
    labels = [mix.label if mix is not None else "base" for mix in mixes]
    owned = [t for s in stacked.values() for t in vars(s).values() if isinstance(t, torch.Tensor)]
    return ActiveMix(
        per_sample=stacked,
        label=label or " | ".join(labels),
        nbytes=tensor_bytes(owned),
        samples=len(mixes),
    )


def _to_merge(
    unet: torch.nn.Module, terms: Mapping[str, Sequence[tuple[LoraTerm, ...]]], budget: int
) -> set[str]:
    """The layers to merge per sample: those whose pairs cost most against the layer first
    (rank * (fan_in + out) / (fan_in * out) multiply-adds per output), while their copies (one
    weight per sample) fit in `budget` bytes."""
    ranked = []
    for module, per_sample in terms.items():
        weight = cast(torch.Tensor, unet.get_submodule(module).weight)
        out, fan_in = int(weight.shape[0]), math.prod(weight.shape[1:])
        rank = max(sum(int(term.a.shape[0]) for term in sample) for sample in per_sample)
        relative = rank * (fan_in + out) / (fan_in * out)
        nbytes = len(per_sample) * weight.numel() * weight.element_size()
        ranked.append((-relative, nbytes, module))
    chosen: set[str] = set()
    spent = 0
    for _, nbytes, module in sorted(ranked):
        if spent + nbytes <= budget:
            chosen.add(module)
            spent += nbytes
    return chosen


def _merge_each(layer: torch.nn.Module, pairs: SampleTerms) -> SampleWeights:
    """The layer's weight plus each sample's pairs: one batched product from the stacks."""
    weight = cast(torch.Tensor, layer.weight).detach()
    bias = cast(torch.Tensor | None, layer.bias)
    samples = pairs.samples
    if weight.dim() == 2:  # Linear: W^T + A^T B^T per sample, [S, in, out]
        merged = torch.baddbmm(weight.t(), pairs.a, pairs.b)
        return SampleWeights(merged, None if bias is None else bias.detach(), samples)
    low = pairs.a.reshape(samples, pairs.rank, -1)  # [S, R, in * kh * kw]
    merged = torch.baddbmm(weight.flatten(1), pairs.b, low)  # [S, out, in * kh * kw]
    grouped_bias = None if bias is None else bias.detach().repeat(samples)
    return SampleWeights(merged.view(-1, *weight.shape[1:]), grouped_bias, samples)


def _stack(module: str, per_sample: Sequence[tuple[LoraTerm, ...]]) -> SampleTerms:
    """The module's pairs of every sample, stacked and zero-padded to the largest summed rank."""
    first = next(term for terms in per_sample for term in terms)
    samples = len(per_sample)
    rank = max(sum(int(term.a.shape[0]) for term in terms) for terms in per_sample)
    a = first.a.new_zeros((samples, rank, *first.a.shape[1:]))
    b = first.b.new_zeros((samples, first.b.shape[0], rank))
    for sample, terms in enumerate(per_sample):
        offset = 0
        for term in terms:
            r = int(term.a.shape[0])
            a[sample, offset : offset + r] = term.a
            b[sample, :, offset : offset + r] = (term.b.flatten(1).float() * term.coeff).to(b.dtype)
            offset += r
    if first.a.dim() == 2:  # Linear: transposed once here, not at every step
        return SampleTerms(
            a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous(), samples, rank
        )
    return SampleTerms(a.flatten(0, 1), b, samples, rank)


def _check(spec: LoraSpec, mix: Mix) -> None:
    check_weights(mix)
    for adapter, _ in mix:
        check_compatible(adapter, spec)


def describe_mix(mix: Mix) -> str:
    """A short label: each adapter's `adapter_id` (else its position) and its weight."""
    parts = [f"{a.extra.get('adapter_id', f'#{i}')}x{w:g}" for i, (a, w) in enumerate(mix)]
    return "+".join(parts) or "base"


@contextlib.contextmanager
def use_mix(mix: ActiveMix | None) -> Iterator[None]:
    """Within the block, this thread's (or task's) forward passes use `mix` (None: the base)."""
    token = _ACTIVE.set(mix)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mix() -> ActiveMix | None:
    """The mix in force in the current context."""
    return _ACTIVE.get()
