"""The weighted sum of many low-rank products, truncated to a rank, without forming any product.

A module's aggregate is `M = sum_i c_i B_i A_i` (B_i [out, r_i], A_i [r_i, in]). The updates
are read once: each chunk of updates is copied, per group of modules of one (out, in) shape,
into one contiguous block, A rows as [G, C, in] and B columns as [G, C, out] (C the chunk's
summed rank), with each row's factor c_i beside it (`reweigh` may change the factors until
`finish`: the worker settles weights and clip factors after reading every update). Blocks
stay in memory up to `SketchOptions.resident_bytes` and go to a temporary file
(memory-mapped) beyond, so memory does not grow with the number of updates past that budget.
Every later step is a few large matrix products over the blocks, per group, never a loop over
updates.

M's best rank-`rank` approximation then comes in one of two ways:

- *stacked* (exact): while the summed rank R = sum r_i stays within `exact_rank`, the blocks
  side by side are `B_all diag(c) A_all`; `qr(B_all diag(c)) = Q_b R_b`, `qr(A_all^T) = Q_a
  R_a` and the SVD of the small R x R core `R_b R_a^T` give M's SVD exactly (float64), in time
  O(R^2 (out + in)) per module.
- *sketched* (a randomized range finder, Halko-Martinsson-Tropp 2011): the first pass sums
  `Y = M Omega` for a Gaussian Omega [in, k] (k = rank + oversample), `Q = qr(Y)`; then
  passes alternate `X = M^T Q` (`P = qr(X)`) and `Y = M P` (`Q = qr(Y)`), each raising the
  power of M's spectrum the basis sees by one (`power_passes` of them beyond the plain range
  finder's `X = M^T Q`); the last product's SVD gives the result, `M ~ Q X^T` or
  `M ~ Y P^T`. Each pass reads every block once: `M X = B_all (c * (A_all X))`, a few large
  matrix products per group. When k >= min(out, in) the range is the whole space and the
  result is exact.

Passes run in float32, the updates' own precision; every QR and SVD runs in float64.

Energy: stacked and full-range sketches know M's energy exactly. A narrower sketch estimates the
energy outside its range from `PROBES` extra Gaussian columns of the first pass that Q never
sees (E ||(I - QQ^T) M g||^2 = ||(I - QQ^T) M||_F^2 for g ~ N(0, I)); `estimated` says so.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import torch

Pairs = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""One update's flat factors per module: (A [r, in], B [out, r])."""
Chunk = Sequence[tuple[Pairs, float]]
"""A few consecutive updates: their pairs, and each one's factor (weight times scale)."""

PROBES = 4
_WIDE = torch.float64
STACKED_SLICE_BYTES = 256 << 20
"""About how many bytes of float64 copies the exact path holds at once (modules per slice)."""


@dataclass(frozen=True)
class SketchOptions:
    """How the sketched path trades time for accuracy (the stacked path is always exact), and
    how many bytes of the updates' factors stay in memory (the rest in a temporary file in
    `spill_dir`, the system's temporary directory when None)."""

    oversample: int = 4
    power_passes: int = 1
    exact_rank: int = 256
    seed: int = 0
    resident_bytes: int = 4 << 30
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("oversample", "power_passes", "exact_rank", "resident_bytes"):
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


@dataclass(frozen=True)
class _Block:
    """One chunk of updates' factors for one group: A rows, B columns (as rows), factors."""

    a: torch.Tensor  # [G, C, in]
    bt: torch.Tensor  # [G, C, out]
    factors: torch.Tensor  # [C, 1]: each row's weight times scale


@dataclass
class _Group:
    """The modules of one (out, in) shape and their blocks."""

    modules: tuple[str, ...]
    out: int
    inner: int
    width: int
    omega: torch.Tensor  # [in, width + probes]: the first pass's Gaussian test matrix
    blocks: list[_Block] = field(default_factory=list)

    @property
    def probes(self) -> int:
        return int(self.omega.shape[1]) - self.width

    @property
    def full(self) -> bool:
        return self.width >= min(self.out, self.inner)

    def range(self, x: torch.Tensor) -> torch.Tensor:
        """M X for X [G, in, k] (or [in, k], shared by every module): [G, out, k]."""
        y = torch.zeros(len(self.modules), self.out, x.shape[-1])
        for block in self.blocks:
            y.baddbmm_(block.bt.mT, torch.matmul(block.a, x).mul_(block.factors))
        return y

    def co_range(self, q: torch.Tensor) -> torch.Tensor:
        """M^T Q for Q [G, out, k]: [G, in, k]."""
        x = torch.zeros(len(self.modules), self.inner, q.shape[-1])
        for block in self.blocks:
            x.baddbmm_(block.a.mT, torch.bmm(block.bt, q).mul_(block.factors))
        return x


class Spill:
    """An unnamed temporary file the blocks past the memory budget are written to and mapped."""

    def __init__(self, directory: str | None) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115
        self._end = 0

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` written to the file, returned as a read-only view of the mapped bytes."""
        self._file.seek(self._end)
        tensor.numpy().tofile(self._file)
        self._file.flush()
        mapped = np.memmap(
            self._file, dtype=np.float32, mode="r", offset=self._end, shape=tuple(tensor.shape)
        )
        self._end += tensor.numel() * 4
        with _quiet_readonly():
            return torch.from_numpy(mapped)

    @property
    def size(self) -> int:
        return self._end

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def _quiet_readonly() -> Iterator[None]:
    """torch warns that a read-only array makes a non-writable tensor; these are only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        yield


class LowRankSum:
    """Reads updates once into per-shape blocks, then truncates every module's sum to `rank`."""

    def __init__(
        self, shapes: Mapping[str, tuple[int, int]], *, rank: int, options: SketchOptions
    ) -> None:
        by_shape: dict[tuple[int, int], list[str]] = {}
        for module, shape in sorted(shapes.items()):
            by_shape.setdefault(shape, []).append(module)
        self._rank = rank
        self._options = options
        self._summed_rank = 0
        self._resident = 0
        self._spill: Spill | None = None
        self._scratch: dict[tuple[int, ...], torch.Tensor] = {}
        self._factors: list[tuple[torch.Tensor, list[int]]] = []  # per chunk, shared by groups
        generator = torch.Generator().manual_seed(options.seed)
        self._groups = []
        for (out, inner), modules in sorted(by_shape.items()):
            width = min(rank + options.oversample, out, inner)
            probes = 0 if width >= min(out, inner) else PROBES
            omega = torch.randn(inner, width + probes, generator=generator)
            self._groups.append(_Group(tuple(modules), out, inner, width, omega))

    @property
    def resident_values(self) -> int:
        """How many factor values the blocks hold in memory now (spilled ones not counted)."""
        return self._resident // 4

    @property
    def spilled_bytes(self) -> int:
        """How many bytes of factors went to the temporary file."""
        return 0 if self._spill is None else self._spill.size

    @property
    def stacked(self) -> bool:
        """True while the summed rank fits `exact_rank`: the result will be exact."""
        return self._summed_rank <= self._options.exact_rank

    def add(self, chunk: Chunk) -> None:
        """Copy a chunk of updates' factors into one block per group (memory or the file)."""
        if not chunk:
            return
        ranks = [_rank_of(update) for update in chunk]
        self._summed_rank += sum(ranks)
        factors = torch.cat([torch.full((r, 1), c) for r, (_, c) in zip(ranks, chunk, strict=True)])
        self._factors.append((factors, ranks))
        rows = int(factors.shape[0])
        for group in self._groups:
            a, bt = _gather(group, chunk, rows, self._scratch)
            size = 4 * (a.numel() + bt.numel())
            if self._resident + size > self._options.resident_bytes:
                if self._spill is None:
                    self._spill = Spill(self._options.spill_dir)
                a, bt = self._spill.keep(a), self._spill.keep(bt)
            else:
                self._resident += size
            group.blocks.append(_Block(a, bt, factors))

    def reweigh(self, factors: Sequence[float]) -> None:
        """Replace every added update's factor, in the order they were added (0 leaves one out):
        for weights settled after the updates were read."""
        count = sum(len(ranks) for _, ranks in self._factors)
        if len(factors) != count:
            raise ValueError(f"{len(factors)} factors for {count} updates")
        given = iter(factors)
        for rows, ranks in self._factors:
            rows.copy_(torch.cat([torch.full((r, 1), next(given)) for r in ranks]))

    def finish(self) -> dict[str, Truncated]:
        """Each module's truncation (the blocks are released, the file removed)."""
        try:
            out: dict[str, Truncated] = {}
            for group in self._groups:
                if not group.blocks:
                    raise ValueError("no updates with a positive weight were added")
                out.update(_stacked(group, self._rank) if self.stacked else self._sketched(group))
                group.blocks = []
            return out
        finally:
            self._resident = 0
            if self._spill is not None:
                self._spill.close()
                self._spill = None

    def _sketched(self, group: _Group) -> dict[str, Truncated]:
        """The range finder on one group: from the first pass's `M Omega`, passes that
        alternate `X = M^T Q` and `Y = M P` (each raising the power of M's spectrum the basis
        sees by one), then the SVD of the last product, `Q^T M = X^T` or `M P`."""
        sketch = group.range(group.omega).to(_WIDE)  # M Omega
        probes = sketch[:, :, group.width :] if group.probes else None
        left = _orthonormal(sketch[:, :, : group.width])
        passes = 1 + (0 if group.full else self._options.power_passes)
        right = product = torch.empty(0)
        total: torch.Tensor | None = None
        for index in range(passes):
            if index % 2 == 0:
                product = group.co_range(left.float()).to(_WIDE)  # X = M^T Q, [G, in, k]
                total = product.square().sum(dim=(1, 2)) + _outside(left, probes)
                if index + 1 < passes:
                    right = _orthonormal(product)
            else:
                product = group.range(right.float()).to(_WIDE)  # Y = M P, [G, out, k]
                if index + 1 < passes:
                    left = _orthonormal(product)
        assert total is not None
        estimated = probes is not None
        if passes % 2:  # M ~ Q (Q^T M) = Q X^T
            u, s, vh = _small_svd(product.mT)
            return _results(group.modules, left @ u, s, vh, total, estimated=estimated)
        u, s, vh = _small_svd(product)  # M ~ (M P) P^T
        return _results(group.modules, u, s, vh @ right.mT, total, estimated=estimated)


def _rank_of(update: tuple[Pairs, float]) -> int:
    return int(next(iter(update[0].values()))[0].shape[0])


def _gather(
    group: _Group, chunk: Chunk, rows: int, scratch: dict[tuple[int, ...], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's factors for one group: A as [G, C, in], B transposed as [G, C, out].

    Each run of updates of one rank has its B [out, r] stacked as stored (into a reused
    `scratch` buffer), then transposed in one copy: copying thousands of small transposed views
    one by one is several times slower. The new blocks are zeroed before the copies: faulting
    fresh pages in while copying small pieces into them costs about twice as much here."""
    count = len(group.modules)
    a = torch.empty(count * rows, group.inner).zero_()
    bt = torch.empty(count, rows, group.out).zero_()
    torch.cat([pairs[m][0] for m in group.modules for pairs, _ in chunk], out=a)
    start = 0
    for rank, run in itertools.groupby(chunk, key=_rank_of):
        same = list(run)
        shape = (count * len(same), group.out, rank)
        if shape not in scratch:
            scratch[shape] = torch.empty(shape).zero_()
        b = scratch[shape]
        torch.cat([pairs[m][1] for m in group.modules for pairs, _ in same], out=b.view(-1, rank))
        end = start + rank * len(same)
        target = bt[:, start:end].view(count, len(same), rank, group.out)
        target.copy_(b.view(count, len(same), group.out, rank).mT)
        start = end
    return a.view(count, rows, group.inner), bt


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: small batched QR and SVD gain nothing from more, and on a busy
    machine their threads contend (10x slower with 2 threads on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orthonormal(sketch: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of each batch member's columns, in float64."""
    with one_thread():
        return torch.linalg.qr(sketch.to(_WIDE)).Q


def _stacked(group: _Group, rank: int) -> dict[str, Truncated]:
    """Exact SVD of `sum c B A` from the blocks, kept to its first `rank` singular triplets
    (the energy counts them all): qr of each side, SVD of the small core; the group's modules a
    slice at a time, so the float64 copies stay within `STACKED_SLICE_BYTES` whatever the
    group's size."""
    rows = sum(int(block.factors.shape[0]) for block in group.blocks)
    per_module = 3 * rows * (group.out + group.inner) * _WIDE.itemsize  # factors, Q, Q @ u
    step = max(1, STACKED_SLICE_BYTES // per_module)
    out: dict[str, Truncated] = {}
    for start in range(0, len(group.modules), step):
        part = slice(start, start + step)
        a = torch.cat([block.a[part] for block in group.blocks], dim=1).to(_WIDE)
        b = torch.cat([block.bt[part] * block.factors for block in group.blocks], dim=1)
        b = b.to(_WIDE).mT
        with one_thread():
            qb, rb = torch.linalg.qr(b)
            del b
            qa, ra = torch.linalg.qr(a.mT)
            del a
            u, s, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
        energy = s.square().sum(dim=1)
        u, s, vh = u[:, :, :rank], s[:, :rank], vh[:, :rank]
        left, right = qb @ u, vh @ qa.mT
        out.update(_results(group.modules[part], left, s, right, energy, estimated=False))
    return out


def _outside(left: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor | float:
    """||(I - QQ^T) M||_F^2 estimated from the probe columns `M g` (0 without probes)."""
    if probes is None:
        return 0.0
    residual = probes - left @ (left.mT @ probes)
    return residual.square().sum(dim=(1, 2)) / probes.shape[2]


def _small_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a batch of tall or wide matrices through the QR of the long side (float64)."""
    with one_thread():
        if matrix.shape[1] >= matrix.shape[2]:
            q, r = torch.linalg.qr(matrix)
            u, s, vh = torch.linalg.svd(r)
            return q @ u, s, vh
        q, r = torch.linalg.qr(matrix.mT)  # matrix = r^T q^T
        u, s, vh = torch.linalg.svd(r.mT)
        return u, s, vh @ q.mT


def _results(
    modules: Sequence[str],
    left: torch.Tensor,
    singular: torch.Tensor,
    right: torch.Tensor,
    energy: torch.Tensor,
    *,
    estimated: bool,
) -> dict[str, Truncated]:
    return {
        m: Truncated(left[i], singular[i], right[i], float(energy[i]), estimated=estimated)
        for i, m in enumerate(modules)
    }
