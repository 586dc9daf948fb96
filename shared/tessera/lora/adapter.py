"""A LoRA adapter as data: per target module a down (A) and up (B) tensor, plus its identity.

Keys follow peft's state-dict names without the adapter name, e.g.
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` ([rank, in]) and
`....lora_B.weight` ([out, rank]). A `nn.Conv2d` target carries a LoCon pair in kohya's (and
peft's) layout: A [rank, in, kh, kw], B [out, rank, 1, 1]. The update a module receives is
`scale * B @ A` on the pair flattened to matrices, reshaped to the module's weight shape, with
`scale = alpha / rank`, as in peft.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")  # GEGLU's inner Linear, then the output Linear
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": _ATTENTION,
    "attention+ff": (*_ATTENTION, *_FEED_FORWARD),
    "full": (*_ATTENTION, *_FEED_FORWARD, "proj_in", "proj_out", "conv1", "conv2"),
}
DEFAULT_TARGETS = "attention"
LORA_TARGETS: tuple[str, ...] = TARGET_PRESETS[DEFAULT_TARGETS]  # the default preset's names
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def preset_targets(name: str) -> tuple[str, ...]:
    """The module-name suffixes of one preset; ValueError naming the known presets."""
    try:
        return TARGET_PRESETS[name]
    except KeyError:
        known = ", ".join(repr(p) for p in TARGET_PRESETS)
        raise ValueError(f"unknown LoRA target preset {name!r}; known presets: {known}") from None


def pair_shapes(
    weight_shape: tuple[int, ...], rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A, B) shapes of a rank-`rank` pair for a Linear (out, in) or Conv2d (out, in, kh, kw)."""
    if len(weight_shape) == 2:
        out_features, in_features = weight_shape
        return (rank, in_features), (out_features, rank)
    if len(weight_shape) == 4:
        out_channels, *in_and_kernel = weight_shape
        return (rank, *in_and_kernel), (out_channels, rank, 1, 1)
    raise ValueError(
        f"weight shape {tuple(weight_shape)} is neither (out, in) nor (out, in, kh, kw)"
    )


def unflatten_pair(
    weight_shape: tuple[int, ...], a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices A [rank, in*kh*kw], B [out, rank] reshaped to the pair layout of `weight_shape`."""
    a_shape, b_shape = pair_shapes(weight_shape, int(a.shape[0]))
    return a.reshape(a_shape), b.reshape(b_shape)


@dataclass(frozen=True)
class LoraSpec:
    """What a base model accepts: its id and weight hash, its target preset, each target's shape.

    `modules` maps a module name to its weight shape: (out, in) for a Linear, (out, in, kh, kw)
    for a Conv2d.
    """

    base_model_id: str
    base_model_hash: str
    modules: Mapping[str, tuple[int, ...]]
    max_rank: int = 64
    targets: str = DEFAULT_TARGETS
    min_scale: float = 0.0  # the LoRA scales alpha / rank accepted (TESSERA_*_LORA_SCALE)
    max_scale: float = float("inf")

    def __post_init__(self) -> None:
        preset_targets(self.targets)
        for module, shape in self.modules.items():
            if len(shape) not in (2, 4):
                raise ValueError(
                    f"module {module!r} has weight shape {tuple(shape)}; "
                    "need (out, in) or (out, in, kh, kw)"
                )

    @property
    def keys(self) -> frozenset[str]:
        """Every tensor key a complete adapter for this base carries."""
        return frozenset(
            f"{module}{suffix}" for module in self.modules for suffix in (A_SUFFIX, B_SUFFIX)
        )


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter: float32 tensors keyed by peft names, its rank and alpha, and its base."""

    tensors: Mapping[str, torch.Tensor]
    rank: int
    alpha: float
    base_model_id: str
    base_model_hash: str
    target_modules: tuple[str, ...] = LORA_TARGETS
    extra: Mapping[str, str] = field(default_factory=dict)
    targets: str = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        """The factor peft applies to `B @ A`."""
        return self.alpha / self.rank

    @cached_property
    def modules(self) -> tuple[str, ...]:
        """The adapted module names, sorted (computed once: a mix reads them on every switch)."""
        return tuple(
            sorted(key[: -len(A_SUFFIX)] for key in self.tensors if key.endswith(A_SUFFIX))
        )

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module as stored: [rank, in], [out, rank] or the conv layout."""
        return self.tensors[module + A_SUFFIX], self.tensors[module + B_SUFFIX]

    def flat_pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank, in*kh*kw], B [out, rank]) of one module: its pair as matrices."""
        a, b = self.pair(module)
        if a.ndim == 2 and b.ndim == 2:  # a linear pair already is (thousands per aggregation)
            return a, b
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def weight_shape(self, module: str) -> tuple[int, ...]:
        """The shape of the weight the module's pair updates: (out, in) or (out, in, kh, kw)."""
        a, b = self.pair(module)
        return (int(b.shape[0]), *(int(n) for n in a.shape[1:]))

    def pairs(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(module, A, B) for every adapted module, in sorted order."""
        for module in self.modules:
            a, b = self.pair(module)
            yield module, a, b

    def delta(self, module: str) -> torch.Tensor:
        """The weight update `scale * B @ A` this adapter gives one module, in its weight shape."""
        a, b = self.flat_pair(module)
        return ((b.float() @ a.float()) * self.scale).reshape(self.weight_shape(module))

    @property
    def parameters(self) -> int:
        """Number of values in A and B over all modules."""
        return sum(t.numel() for t in self.tensors.values())

    def with_extra(self, **values: str) -> LoraAdapter:
        """A copy with more string metadata (e.g. samples, started_from)."""
        return replace(self, extra={**self.extra, **values})


def lora_spec(
    unet: torch.nn.Module,
    *,
    base_model_id: str,
    base_model_hash: str,
    targets: str = DEFAULT_TARGETS,
    max_rank: int = 64,
) -> LoraSpec:
    """The spec of a UNet for one target preset: its matching `nn.Linear` and `nn.Conv2d` layers.

    A module matches a target when its name is the target or ends in "." + target; a match of
    another type (e.g. diffusers' GEGLU) is skipped. Reads module types and sizes only, never
    weight values, so a UNet on the meta device will do.
    """
    import torch

    names = preset_targets(targets)
    modules: dict[str, tuple[int, ...]] = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in names):
            continue
        if isinstance(module, torch.nn.Linear):
            modules[name] = (module.out_features, module.in_features)
        elif isinstance(module, torch.nn.Conv2d) and module.groups == 1:
            # a grouped conv has no single [in, kh, kw] input for a LoCon A to read
            modules[name] = (module.out_channels, module.in_channels, *module.kernel_size)
    if not modules:
        raise ValueError(
            f"target preset {targets!r} matches no nn.Linear or nn.Conv2d in the model "
            f"(module names ending in {', '.join(names)})"
        )
    return LoraSpec(
        base_model_id=base_model_id,
        base_model_hash=base_model_hash,
        modules=dict(sorted(modules.items())),
        max_rank=max_rank,
        targets=targets,
    )


def zeros_like_spec(spec: LoraSpec, rank: int, alpha: float) -> LoraAdapter:
    """An adapter that changes nothing (all B zero), for tests and as a neutral start."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for module, shape in spec.modules.items():
        a_shape, b_shape = pair_shapes(shape, rank)
        tensors[module + A_SUFFIX] = torch.zeros(a_shape)
        tensors[module + B_SUFFIX] = torch.zeros(b_shape)
    return _for_spec(spec, tensors, rank, alpha)


def random_adapter(
    spec: LoraSpec, rank: int, alpha: float, *, seed: int, std: float = 0.02
) -> LoraAdapter:
    """An adapter with Gaussian A and B (seeded): a stand-in for a trained one in tests."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, shape in spec.modules.items():
        a_shape, b_shape = pair_shapes(shape, rank)
        tensors[module + A_SUFFIX] = torch.randn(a_shape, generator=generator) * std
        tensors[module + B_SUFFIX] = torch.randn(b_shape, generator=generator) * std
    return _for_spec(spec, tensors, rank, alpha)


def _for_spec(
    spec: LoraSpec, tensors: dict[str, torch.Tensor], rank: int, alpha: float
) -> LoraAdapter:
    return LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=spec.base_model_id,
        base_model_hash=spec.base_model_hash,
        target_modules=TARGET_PRESETS[spec.targets],
        targets=spec.targets,
    )
