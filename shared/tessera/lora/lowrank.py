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
so the Python loop runs per update and shape, not per module. A pass runs in float32, the
updates' own precision, into buffers allocated once (on small machines a fresh allocation's
page faults cost more than the arithmetic); every QR and SVD runs in float64.

Energy: stacked and full-range sketches know M's energy exactly. A narrower sketch estimates the
energy outside its range from `PROBES` extra Gaussian columns of pass 1 that Q never sees
(E ||(I - QQ^T) M g||^2 = ||(I - QQ^T) M||_F^2 for g ~ N(0, I)); `estimated` says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

Pairs = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""One update's flat factors per module: (A [r, in], B [out, r])."""
Chunk = Sequence[tuple[Pairs, float]]
"""A few consecutive updates: their pairs, and each one's factor (weight times scale)."""

PROBES = 8
_WIDE = torch.float64


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
    """The modules of one (out, in) shape, their running sums and reused buffers."""

    modules: tuple[str, ...]
    out: int
    inner: int
    width: int
    omega: torch.Tensor  # [G, in, width + probes], one Gaussian matrix repeated per module
    y: torch.Tensor | None = None  # [G, out, width + probes]
    probes: torch.Tensor | None = None
    buffers: dict[tuple[str | int, ...], torch.Tensor] = field(default_factory=dict)

    @property
    def full(self) -> bool:
        return self.width >= min(self.out, self.inner)

    def buffer(self, use: str, *shape: int) -> torch.Tensor:
        """A float32 [G, *shape] buffer for one use, allocated on first use and reused after."""
        key: tuple[str | int, ...] = (use, *shape)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(len(self.modules), *shape)
        return self.buffers[key]

    def load(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """One update's A [G, r, in] and B [G, out, r], copied into reused buffers."""
        rank = int(pairs[self.modules[0]][0].shape[0])
        a, b = self.buffer("a", rank, self.inner), self.buffer("b", self.out, rank)
        torch.stack([pairs[m][0] for m in self.modules], out=a)
        torch.stack([pairs[m][1] for m in self.modules], out=b)
        return a, b


_Term = Callable[[_Group, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None]
"""Adds one update's share of a pass to its sum in place: (group, operand, A, B, sum, factor)."""


class LowRankSum:
    """Accumulates updates, then truncates every module's weighted sum to `rank`."""

    def __init__(
        self, shapes: Mapping[str, tuple[int, int]], *, rank: int, options: SketchOptions
    ) -> None:
        by_shape: dict[tuple[int, int], list[str]] = {}
        for module, shape in sorted(shapes.items()):
            by_shape.setdefault(shape, []).append(module)
        generator = torch.Generator().manual_seed(options.seed)
        self._options = options
        self._summed_rank = 0
        self._held: list[tuple[Pairs, float]] = []  # the updates so far, while they fit the stack
        self._groups: list[_Group] = []
        for (out, inner), modules in sorted(by_shape.items()):
            width = min(rank + options.oversample, out, inner)
            probes = 0 if width >= min(out, inner) else PROBES
            omega = torch.randn(inner, width + probes, generator=generator)
            omega = omega.expand(len(modules), inner, width + probes).contiguous()
            self._groups.append(_Group(tuple(modules), out, inner, width, omega))

    @property
    def state_values(self) -> int:
        """How many values the running sums hold now (stacked factors or sketches)."""
        held = sum(a.numel() + b.numel() for pairs, _ in self._held for a, b in pairs.values())
        return held + sum(0 if g.y is None else g.y.numel() for g in self._groups)

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
        """Pass 1: hold each update (no copy) while they fit the stack, else sketch `M Omega`."""
        for pairs, factor in chunk:
            self._summed_rank += int(next(iter(pairs.values()))[0].shape[0])
            if self.stacked:
                self._held.append((pairs, factor))
                continue
            for held_pairs, held_factor in [*self._held, (pairs, factor)]:
                for group in self._groups:
                    _sketch_range(group, held_pairs, held_factor)
            self._held = []

    def finish(self, passes: Iterable[Iterable[Chunk]]) -> dict[str, Truncated]:
        """Each module's truncation; `passes` yields the updates again, `passes_left` times."""
        if self.stacked:
            held, self._held = self._held, []
            return {m: t for g in self._groups for m, t in _stacked(g, held).items()}
        sources = iter(passes)
        bases: dict[int, torch.Tensor] = {}
        for key, group in enumerate(self._groups):
            assert group.y is not None
            group.probes = group.y[:, :, group.width :].to(_WIDE)
            bases[key] = _orthonormal(group.y[:, :, : group.width])
            group.y = None
        for _ in range(self._power_iterations):
            co_range = self._sweep(next(sources), bases, _co_range_term, transposed=True)
            co_bases = {key: _orthonormal(x) for key, x in co_range.items()}
            ranges = self._sweep(next(sources), co_bases, _range_term, transposed=False)
            bases = {key: _orthonormal(y) for key, y in ranges.items()}
        cores = self._sweep(next(sources), bases, _core_term, transposed=None)
        out: dict[str, Truncated] = {}
        for key, group in enumerate(self._groups):
            out.update(_sketched(group, bases[key].to(_WIDE), cores[key].to(_WIDE)))
        return out

    def _sweep(
        self,
        chunks: Iterable[Chunk],
        operands: Mapping[int, torch.Tensor],
        term: _Term,
        *,
        transposed: bool | None,
    ) -> dict[int, torch.Tensor]:
        """One pass over the updates: per group, the sum of `term` over every update."""
        sums: dict[int, torch.Tensor] = {}
        for key, group in enumerate(self._groups):
            k = operands[key].shape[2]
            shape = {True: (group.inner, k), False: (group.out, k), None: (k, group.inner)}
            sums[key] = torch.zeros(len(group.modules), *shape[transposed])
        seen = 0
        for chunk in chunks:
            for pairs, factor in chunk:
                seen += int(next(iter(pairs.values()))[0].shape[0])
                for key, group in enumerate(self._groups):
                    term(group, operands[key], *group.load(pairs), sums[key], factor)
            del chunk  # let this chunk go before the source reads the next one
        if seen != self._summed_rank:
            raise ValueError(
                f"the updates changed between passes: summed rank {seen}, "
                f"{self._summed_rank} in the first pass"
            )
        return sums


def _co_range_term(
    group: _Group, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, c: float
) -> None:
    """X += c A^T (B^T Q): M^T Q, a power iteration's first half."""
    t = group.buffer("t", a.shape[1], q.shape[2])
    torch.bmm(b.mT, q, out=t)
    x.baddbmm_(a.mT, t, alpha=c)


def _range_term(
    group: _Group, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, c: float
) -> None:
    """Y += c B (A X): M X, a power iteration's second half."""
    t = group.buffer("t", a.shape[1], x.shape[2])
    torch.bmm(a, x, out=t)
    y.baddbmm_(b, t, alpha=c)


def _core_term(
    group: _Group, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, c: float
) -> None:
    """Z += c (Q^T B) A: the small projection Q^T M whose SVD is the answer."""
    t = group.buffer("t", q.shape[2], a.shape[1])
    torch.bmm(q.mT, b, out=t)
    z.baddbmm_(t, a, alpha=c)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: its small batched products, QR and SVD gain nothing from more,
    and on a busy machine their threads contend (10x slower with 2 threads on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orthonormal(sketch: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of each batch member's columns, computed in float64, as float32."""
    with one_thread():
        return torch.linalg.qr(sketch.to(_WIDE)).Q.float()


def _sketch_range(group: _Group, pairs: Pairs, factor: float) -> None:
    """Y += c B (A Omega): one update's share of the range sketch (and of the probes)."""
    if group.y is None:
        group.y = torch.zeros(len(group.modules), group.out, group.omega.shape[2])
    a, b = group.load(pairs)
    t = group.buffer("t", a.shape[1], group.omega.shape[2])
    torch.bmm(a, group.omega, out=t)
    group.y.baddbmm_(b, t, alpha=factor)


def _stacked(group: _Group, held: Sequence[tuple[Pairs, float]]) -> dict[str, Truncated]:
    """Exact SVD of `sum c B A` from the held factors: qr of each side, SVD of the small core."""
    a = torch.cat([torch.stack([p[m][0] for m in group.modules]) for p, _ in held], dim=1)
    b = torch.cat([torch.stack([p[m][1] for m in group.modules]) * c for p, c in held], dim=2)
    with one_thread():
        qb, rb = torch.linalg.qr(b.to(_WIDE))
        qa, ra = torch.linalg.qr(a.to(_WIDE).mT)
        u, s, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    left, right = qb @ u, vh @ qa.mT
    energy = s.square().sum(dim=1)
    return {
        m: Truncated(left[i], s[i], right[i], float(energy[i]), estimated=False)
        for i, m in enumerate(group.modules)
    }


def _sketched(group: _Group, basis: torch.Tensor, core: torch.Tensor) -> dict[str, Truncated]:
    """SVD of the small `Z = Q^T M`; the energy outside Q's range estimated from the probes."""
    with one_thread():
        qz, rz = torch.linalg.qr(core.mT)  # Z = rz^T qz^T: Z's SVD is that of the small rz^T
        u, s, vh = torch.linalg.svd(rz.mT)
    vh = vh @ qz.mT
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
