"""The weighted sum of many low-rank products, truncated to a rank, without forming any product.

A module's aggregate is `M = sum_i c_i B_i A_i` (B_i [out, r_i], A_i [r_i, in]). Its best
rank-`rank` approximation is found from the factors alone, in one of two ways:

- *stacked* (exact): while the summed rank R = sum r_i stays within `exact_rank`, the factors
  are kept side by side; at the end `qr(B) R_b`, `qr(A^T) R_a` and the SVD of the small core
  `R_b R_a^T` give M's SVD exactly, in memory O(R (out + in)).
- *sketched* (a streamed randomized range finder, Halko-Martinsson-Tropp 2011): pass 1 sums
  `Y = sum c_i B_i (A_i Omega)` for a Gaussian Omega [in, k]; each power iteration is two more
  passes (`X = M^T Q`, `Y = M X`); the last pass sums `Z = sum c_i (Q^T B_i) A_i` and the SVD of
  the small Z gives the result. Memory O(k (out + in)), whatever the number of updates. When
  k >= min(out, in) the range is the whole space and the result is exact.

Modules of one shape are one batch ([modules, ...] tensors; torch's batched matmul, qr, svd),
and updates arrive in chunks whose factors are concatenated, so the Python loop runs per chunk
and shape, not per update and module. Sums run in float64.

Energy: stacked and full-range sketches know M's energy exactly. A narrower sketch estimates the
energy outside its range from `PROBES` extra Gaussian columns of pass 1 that Q never sees
(E ||(I - QQ^T) M g||^2 = ||(I - QQ^T) M||_F^2 for g ~ N(0, I)); `estimated` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

Chunk = Sequence[tuple[Mapping[str, tuple[torch.Tensor, torch.Tensor]], float]]
"""Updates of one chunk: per module its flat (A [r, in], B [out, r]), and the update's factor."""

PROBES = 16
_DTYPE = torch.float64
_Term = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""One pass's per-chunk product: (operand, A [G, R, in], B [G, out, R]) -> a term of its sum."""


@dataclass(frozen=True)
class SketchOptions:
    """How the sketched path trades time for accuracy (the stacked path is always exact)."""

    oversample: int = 8
    power_iterations: int = 1
    exact_rank: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("oversample", "power_iterations", "exact_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


DEFAULT_SKETCH = SketchOptions()


@dataclass(frozen=True)
class Truncated:
    """One module's rank-truncated aggregate `left @ diag(s) @ right`, and its energy."""

    left: torch.Tensor  # [out, k] orthonormal columns
    singular: torch.Tensor  # [k], descending
    right: torch.Tensor  # [k, in] orthonormal rows
    total_energy: float
    estimated: bool


@dataclass
class _Group:
    """The modules of one (out, in) shape and their running sums."""

    modules: tuple[str, ...]
    out: int
    inner: int
    width: int
    omega: torch.Tensor  # [in, width + probes]
    stack_a: list[torch.Tensor]
    stack_b: list[torch.Tensor]
    y: torch.Tensor | None = None
    probes: torch.Tensor | None = None

    @property
    def full(self) -> bool:
        return self.width >= min(self.out, self.inner)


def _batch(chunk: Chunk, modules: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A [G, R, in] and c-scaled B [G, out, R] of a chunk, its updates side by side."""
    a = torch.cat(
        [torch.stack([pairs[m][0] for m in modules]).to(_DTYPE) for pairs, _ in chunk], dim=1
    )
    b = torch.cat(
        [torch.stack([pairs[m][1] for m in modules]).to(_DTYPE) * c for pairs, c in chunk],
        dim=2,
    )
    return a, b


class LowRankSum:
    """Accumulates chunks of updates, then truncates every module's weighted sum to `rank`."""

    def __init__(
        self, shapes: Mapping[str, tuple[int, int]], *, rank: int, options: SketchOptions
    ) -> None:
        by_shape: dict[tuple[int, int], list[str]] = {}
        for module, shape in sorted(shapes.items()):
            by_shape.setdefault(shape, []).append(module)
        generator = torch.Generator().manual_seed(options.seed)
        self._options = options
        self._rank = rank
        self._summed_rank = 0
        self._groups: list[_Group] = []
        for (out, inner), modules in sorted(by_shape.items()):
            width = min(rank + options.oversample, out, inner)
            probes = 0 if width >= min(out, inner) else PROBES
            omega = torch.randn(inner, width + probes, generator=generator, dtype=_DTYPE)
            self._groups.append(_Group(tuple(modules), out, inner, width, omega, [], []))

    @property
    def state_values(self) -> int:
        """How many float64 values the running sums hold now (stacked factors or sketches)."""
        held = [t for g in self._groups for t in (*g.stack_a, *g.stack_b, g.y) if t is not None]
        return sum(t.numel() for t in held)

    @property
    def stacked(self) -> bool:
        """True while the summed rank fits `exact_rank`: the result will be exact."""
        return self._summed_rank <= self._options.exact_rank

    @property
    def passes_left(self) -> int:
        """How many more passes over the same updates `finish` needs (0 when stacked)."""
        return 0 if self.stacked else 1 + 2 * self._power_iterations

    @property
    def _power_iterations(self) -> int:
        return 0 if all(g.full for g in self._groups) else self._options.power_iterations

    def add(self, chunk: Chunk) -> None:
        """Pass 1: stack the chunk's factors, or add its range sketch `M Omega`."""
        if not chunk:
            return
        rank = sum(int(next(iter(pairs.values()))[0].shape[0]) for pairs, _ in chunk)
        self._summed_rank += rank
        for group in self._groups:
            a, b = _batch(chunk, group.modules)
            if self.stacked:
                group.stack_a.append(a)
                group.stack_b.append(b)
                continue
            if group.stack_a:  # the summed rank has just outgrown the stack: sketch it
                a = torch.cat([*group.stack_a, a], dim=1)
                b = torch.cat([*group.stack_b, b], dim=2)
                group.stack_a, group.stack_b = [], []
            term = b @ (a @ group.omega)
            group.y = term if group.y is None else group.y + term

    def finish(self, passes: Iterable[Iterable[Chunk]]) -> dict[str, Truncated]:
        """Each module's truncation; `passes` yields the updates again, `passes_left` times."""
        if self.stacked:
            return {m: t for g in self._groups for m, t in _stacked(g).items()}
        sources = iter(passes)
        bases = {}
        for group in self._groups:
            assert group.y is not None
            group.probes = group.y[:, :, group.width :]
            bases[id(group)] = torch.linalg.qr(group.y[:, :, : group.width]).Q
            group.y = None
        for _ in range(self._power_iterations):
            co_range = self._sweep(next(sources), bases, lambda q, a, b: a.mT @ (b.mT @ q))
            co_bases = {key: torch.linalg.qr(x).Q for key, x in co_range.items()}
            ranges = self._sweep(next(sources), co_bases, lambda x, a, b: b @ (a @ x))
            bases = {key: torch.linalg.qr(y).Q for key, y in ranges.items()}
        cores = self._sweep(next(sources), bases, lambda q, a, b: (q.mT @ b) @ a)
        out: dict[str, Truncated] = {}
        for group in self._groups:
            out.update(_sketched(group, bases[id(group)], cores[id(group)]))
        return out

    def _sweep(
        self,
        chunks: Iterable[Chunk],
        operands: Mapping[int, torch.Tensor],
        term: _Term,
    ) -> dict[int, torch.Tensor]:
        """One pass over the updates: per group, the sum of `term(operand, A, B)` over chunks."""
        sums: dict[int, torch.Tensor] = {}
        seen = 0
        for chunk in chunks:
            seen += sum(int(next(iter(p.values()))[0].shape[0]) for p, _ in chunk)
            for group in self._groups:
                a, b = _batch(chunk, group.modules)
                key = id(group)
                value = term(operands[key], a, b)
                sums[key] = sums[key] + value if key in sums else value
            del chunk, a, b  # let this chunk go before the source reads the next one
        if seen != self._summed_rank:
            raise ValueError(
                f"the updates changed between passes: summed rank {seen}, "
                f"{self._summed_rank} in the first pass"
            )
        return sums


def _stacked(group: _Group) -> dict[str, Truncated]:
    """Exact SVD of `B A` from the stacked factors: qr of each side, SVD of the small core."""
    a = torch.cat(group.stack_a, dim=1)
    b = torch.cat(group.stack_b, dim=2)
    group.stack_a, group.stack_b = [], []
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.mT)
    u, s, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    left, right = qb @ u, vh @ qa.mT
    energy = s.square().sum(dim=1)
    return {
        m: Truncated(left[i], s[i], right[i], float(energy[i]), estimated=False)
        for i, m in enumerate(group.modules)
    }


def _sketched(group: _Group, basis: torch.Tensor, core: torch.Tensor) -> dict[str, Truncated]:
    """SVD of the small `Z = Q^T M`; the energy outside Q's range estimated from the probes."""
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    left = basis @ u
    energy = s.square().sum(dim=1)
    estimated = not group.full
    if estimated:
        assert group.probes is not None
        residual = group.probes - basis @ (basis.mT @ group.probes)
        energy = energy + residual.square().sum(dim=(1, 2)) / group.probes.shape[2]
    return {
        m: Truncated(left[i], s[i], vh[i], float(energy[i]), estimated=estimated)
        for i, m in enumerate(group.modules)
    }
