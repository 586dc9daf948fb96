"""A LoRA adapter as data: per target module a down (A) and up (B) matrix, plus its identity.

Keys follow peft's state-dict names without the adapter name, e.g.
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` ([rank, in]) and
`....lora_B.weight` ([out, rank]). The update a module receives is `scale * B @ A` with
`scale = alpha / rank`, as in peft.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraSpec:
    """What a base model accepts: its id and weight hash, and each target's (out, in) shape."""

    base_model_id: str
    base_model_hash: str
    modules: Mapping[str, tuple[int, int]]
    max_rank: int = 64

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

    @property
    def scale(self) -> float:
        """The factor peft applies to `B @ A`."""
        return self.alpha / self.rank

    @property
    def modules(self) -> list[str]:
        """The adapted module names, sorted."""
        return sorted(key[: -len(A_SUFFIX)] for key in self.tensors if key.endswith(A_SUFFIX))

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank, in], B [out, rank]) of one module."""
        return self.tensors[module + A_SUFFIX], self.tensors[module + B_SUFFIX]

    def pairs(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(module, A, B) for every adapted module, in sorted order."""
        for module in self.modules:
            a, b = self.pair(module)
            yield module, a, b

    def delta(self, module: str) -> torch.Tensor:
        """The weight update `scale * B @ A` [out, in] this adapter gives one module."""
        a, b = self.pair(module)
        return (b.float() @ a.float()) * self.scale

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
    targets: tuple[str, ...] = LORA_TARGETS,
    max_rank: int = 64,
) -> LoraSpec:
    """The spec of a UNet: every `nn.Linear` whose name ends in one of `targets`."""
    import torch

    modules: dict[str, tuple[int, int]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            modules[name] = (module.out_features, module.in_features)
    if not modules:
        raise ValueError(f"the model has no linear layers named {', '.join(targets)}")
    return LoraSpec(
        base_model_id=base_model_id,
        base_model_hash=base_model_hash,
        modules=dict(sorted(modules.items())),
        max_rank=max_rank,
    )


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes: which base weights these are."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def zeros_like_spec(spec: LoraSpec, rank: int, alpha: float) -> LoraAdapter:
    """An adapter that changes nothing (all B zero), for tests and as a neutral start."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for module, (out_features, in_features) in spec.modules.items():
        tensors[module + A_SUFFIX] = torch.zeros(rank, in_features)
        tensors[module + B_SUFFIX] = torch.zeros(out_features, rank)
    return LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=spec.base_model_id,
        base_model_hash=spec.base_model_hash,
    )


def random_adapter(
    spec: LoraSpec, rank: int, alpha: float, *, seed: int, std: float = 0.02
) -> LoraAdapter:
    """An adapter with Gaussian A and B (seeded): a stand-in for a trained one in tests."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (out_features, in_features) in spec.modules.items():
        tensors[module + A_SUFFIX] = torch.randn(rank, in_features, generator=generator) * std
        tensors[module + B_SUFFIX] = torch.randn(out_features, rank, generator=generator) * std
    return LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=spec.base_model_id,
        base_model_hash=spec.base_model_hash,
    )
