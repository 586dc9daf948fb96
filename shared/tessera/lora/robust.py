"""Robust selection of a cluster's updates, on random sketches of their products.

Distances between updates are distances between their products `scale * B @ A`, which are
never formed: each module's product is sketched as `L^T (scale * B @ A) R = scale * (L^T B)(A R)`
with fixed Gaussian L [out, k] and R [in, k] (k x k numbers per module, computed from the
factors), which preserves squared distances in expectation. The rules then choose which updates
to keep; the kept ones are aggregated exactly (`aggregate.py`), so the result is still the exact
mean of whole LoRA products, not a coordinate-wise mixture of them.

- `multi_krum` (Blanchard et al. 2017, as in Flower's Krum): each update's score is the sum of
  squared distances to its n - f - 2 nearest others; the n - f lowest scores are kept.
- `trimmed_by_median`: the coordinate-wise median of the sketches is a robust centre; the
  `trim` share of updates farthest from it is dropped.
- `norm_outliers` needs no sketch: it drops only the updates whose product's norm is more than
  `ratio` times the group's median norm. Unlike the two above it drops no honest update when
  nobody attacks, which matters when honest devices are far apart (independently trained
  adapters are: dropping one moves a cluster of 8 by about a quarter; docs/bench_robustness.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from tessera.lora.adapter import LoraAdapter

SKETCH_WIDTH = 8


class Sketcher:
    """Bilinear Gaussian sketches of adapters' products, with one (L, R) pair per module."""

    def __init__(self, *, seed: int = 0, width: int = SKETCH_WIDTH) -> None:
        self._seed = seed
        self._width = width
        self._maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def sketch(self, adapter: LoraAdapter) -> torch.Tensor:
        """The adapter's product sketched, all modules concatenated (float64)."""
        parts = []
        for index, module in enumerate(adapter.modules):
            a, b = (t.detach().to("cpu", torch.float64) for t in adapter.flat_pair(module))
            left, right = self._map(module, index, rows=b.shape[0], cols=a.shape[1])
            parts.append(((left.T @ b) @ (a @ right)).reshape(-1) * adapter.scale)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def _map(
        self, module: str, index: int, *, rows: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._maps.get(module)
        if pair is None or pair[0].shape[0] != rows or pair[1].shape[0] != cols:
            generator = torch.Generator().manual_seed(self._seed * 1_000_003 + index)
            k = self._width
            scale = 1.0 / math.sqrt(k)  # E ||L^T P R||^2 = ||P||^2 with unit-variance / sqrt(k)
            left = torch.randn(rows, k, generator=generator, dtype=torch.float64) * scale
            right = torch.randn(cols, k, generator=generator, dtype=torch.float64) * scale
            pair = self._maps[module] = (left, right)
        return pair


def _squared_distances(sketches: torch.Tensor) -> torch.Tensor:
    squares = sketches.square().sum(dim=1)
    gram = sketches @ sketches.T
    return (squares[:, None] + squares[None, :] - 2 * gram).clamp_min(0.0)


def multi_krum(sketches: torch.Tensor, *, f: int) -> list[int]:
    """Indices of the n - f updates with the lowest Krum scores (at least one), in order."""
    n = sketches.shape[0]
    if n == 0:
        return []
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")
    keep = max(1, n - f)
    if keep >= n:
        return list(range(n))
    distances = _squared_distances(sketches)
    neighbours = max(1, n - f - 2)
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(torch.sort(others).values[:neighbours].sum()))
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:keep]
    return sorted(chosen)


def trimmed_by_median(sketches: torch.Tensor, *, trim: float) -> list[int]:
    """Indices of the updates left after dropping the `trim` share farthest from the median."""
    n = sketches.shape[0]
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must lie in [0, 0.5), got {trim}")
    drop = math.floor(trim * n)
    if n == 0 or drop == 0:
        return list(range(n))
    centre = sketches.median(dim=0).values
    distances = (sketches - centre).square().sum(dim=1)
    order = sorted(range(n), key=lambda i: (float(distances[i]), i))
    return sorted(order[: n - drop])


def norm_outliers(norms: Sequence[float], *, ratio: float) -> list[int]:
    """Indices of the updates whose norm is at most `ratio` times the median norm, in order."""
    if ratio < 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if not norms:
        return []
    bound = ratio * statistics.median(norms)
    return [i for i, norm in enumerate(norms) if norm <= bound]
