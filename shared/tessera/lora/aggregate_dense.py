"""The dense reference for exact aggregation: form every product, sum, full SVD (tests, bench).

`aggregate_exact_dense` computes what `aggregate_exact` approximates by definition: the sum of
`weight * scale * B @ A` per module in float64, normalised, truncated by a full SVD. It costs a
dense [out, in] product per update and module (93.5M values per SD-1.5 attention update), so
it serves only to check and measure the streamed one on small inputs (N <= 100).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tessera.lora.adapter import A_SUFFIX, B_SUFFIX, LoraAdapter, unflatten_pair
from tessera.lora.aggregate import ExactResult, WeightedUpdate, _check_target, _stream
from tessera.lora.lowrank import one_thread


def dense_means(updates: Iterable[WeightedUpdate]) -> dict[str, torch.Tensor]:
    """Each module's weighted mean product `sum w_i scale_i B_i A_i / sum w_i`, as a matrix."""
    sums: dict[str, torch.Tensor] = {}

    def add(adapter: LoraAdapter, weight: float, index: int) -> None:
        if weight == 0:
            return
        for module in adapter.modules:
            a, b = adapter.flat_pair(module)
            if module not in sums:
                sums[module] = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
            sums[module].addmm_(b.double(), a.double(), alpha=adapter.scale * weight)

    _, total, _ = _stream(updates, add)
    return {module: value.div_(total) for module, value in sorted(sums.items())}


def aggregate_exact_dense(
    updates: Iterable[WeightedUpdate], *, rank: int, alpha: float | None = None
) -> ExactResult:
    """The reference aggregate: dense mean products, each truncated to `rank` by a full SVD."""
    listed = list(updates)
    return truncate_means(
        dense_means(listed), listed[0].adapter, count=len(listed), rank=rank, alpha=alpha
    )


def truncate_means(
    means: dict[str, torch.Tensor],
    first: LoraAdapter,
    *,
    count: int,
    rank: int,
    alpha: float | None,
) -> ExactResult:
    """Each mean product truncated to `rank` by a full SVD, in the layout of `first`'s pairs."""
    alpha = _check_target(rank, alpha)
    scale = alpha / rank
    tensors: dict[str, torch.Tensor] = {}
    module_energy: dict[str, float] = {}
    kept_all = total_all = 0.0
    for module, mean in means.items():
        with one_thread():
            u, s, vh = torch.linalg.svd(mean, full_matrices=False)
        k = min(rank, s.numel())
        root = (s[:k] / scale).sqrt()
        a = torch.zeros(rank, mean.shape[1], dtype=torch.float64)
        b = torch.zeros(mean.shape[0], rank, dtype=torch.float64)
        a[:k], b[:, :k] = root[:, None] * vh[:k], u[:, :k] * root
        a_out, b_out = unflatten_pair(first.weight_shape(module), a.float(), b.float())
        tensors[module + A_SUFFIX], tensors[module + B_SUFFIX] = a_out, b_out
        kept, energy = float(s[:k].square().sum()), float(s.square().sum())
        module_energy[module] = kept / energy if energy > 0 else 1.0
        kept_all, total_all = kept_all + kept, total_all + energy
    energy_kept = kept_all / total_all if total_all > 0 else 1.0
    adapter = LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=first.base_model_id,
        base_model_hash=first.base_model_hash,
        target_modules=first.target_modules,
        extra={"method": "exact_dense", "updates": str(count)},
        targets=first.targets,
    )
    return ExactResult(adapter, energy_kept, module_energy)


def residual_ratio(
    result: LoraAdapter, reference: LoraAdapter, means: dict[str, torch.Tensor]
) -> float:
    """||M - result||_F / ||M - reference||_F over all modules: 1 when as good as the best."""
    mine = best = 0.0
    for module, mean in means.items():
        mine += float((mean - result.delta(module).double().reshape(mean.shape)).square().sum())
        best += float((mean - reference.delta(module).double().reshape(mean.shape)).square().sum())
    return (mine / best) ** 0.5 if best > 0 else 1.0 + mine


def relative_error(result: LoraAdapter, reference: LoraAdapter) -> float:
    """||result - reference||_F / ||reference||_F over all modules' products."""
    gap = norm = 0.0
    for module in reference.modules:
        want = reference.delta(module).double()
        gap += float((result.delta(module).double() - want).square().sum())
        norm += float(want.square().sum())
    return (gap / norm) ** 0.5 if norm > 0 else gap**0.5
