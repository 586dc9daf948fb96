"""Aggregation maths for LoRA updates: FedAvg, exact product averaging, neighbour blending.

Every function consumes its updates once, as an iterable (a generator may load each adapter
from the object store on demand), and keeps only running sums plus the current update: memory
does not grow with the number of updates. Weights (e.g. sample counts) are normalised at the end
by dividing the sums by their total. `ExactSum`, `FedAvgSum` and `PrivateSum` take the updates
one `add` at a time, for a reader that settles weights and clip factors only after the last
(the worker): exact's blocks and fedavg's copies then hold every update's factors (in memory up
to a budget, in a temporary file beyond); the private sums do not grow.

`aggregate_fedavg` averages A and B separately, as generic federated learning does; that is not
the average of the updates, since mean(B) @ mean(A) != mean(B @ A). `aggregate_exact` sums the
products `scale * B @ A` in float64 and re-factorises each module to the target rank by SVD.
`aggregate_private` is the Gaussian mechanism of a differentially private round: the dense sum
of the clipped products plus noise, re-factorised the same way. A conv (LoCon) pair enters the
maths as matrices, A [r, in*kh*kw] and B [out, r], and leaves in its own layout,
A [r, in, kh, kw] and B [out, r, 1, 1]; fedavg averages the tensors as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch

from tessera.lora.adapter import A_SUFFIX, B_SUFFIX, LoraAdapter, pair_shapes, unflatten_pair
from tessera.lora.bounds import scaled_update, update_norm
from tessera.lora.lowrank import (
    DEFAULT_SKETCH,
    Chunk,
    LowRankSum,
    SketchOptions,
    Spill,
    Truncated,
    one_thread,
)

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class WeightedUpdate:
    """One adapter and how much it counts (e.g. its number of training samples)."""

    adapter: LoraAdapter
    weight: float


@dataclass(frozen=True)
class ExactResult:
    """A re-factorised adapter and the share of squared singular values its rank kept.

    `sketched`: some module's range was sketched narrower than the module, so the result is
    the range finder's approximation and its energy an estimate; otherwise both are exact.
    """

    adapter: LoraAdapter
    energy_kept: float
    module_energy: Mapping[str, float] = field(default_factory=dict)
    sketched: bool = False


@dataclass(frozen=True)
class _Reference:
    """What every update must share with the first: base, preset, modules and weight shapes."""

    base_model_id: str
    base_model_hash: str
    target_modules: tuple[str, ...]
    targets: str
    shapes: Mapping[str, tuple[int, ...]]
    tensor_shapes: Mapping[str, torch.Size]  # every tensor's shape: the fast path of `check`
    rank: int

    @classmethod
    def of(cls, adapter: LoraAdapter) -> _Reference:
        return cls(
            base_model_id=adapter.base_model_id,
            base_model_hash=adapter.base_model_hash,
            target_modules=adapter.target_modules,
            targets=adapter.targets,
            shapes=_shapes(adapter, index=0),
            tensor_shapes={key: tensor.shape for key, tensor in adapter.tensors.items()},
            rank=adapter.rank,
        )

    def check(self, adapter: LoraAdapter, *, index: int) -> None:
        """Raise ValueError naming the first fact in which `adapter` differs from the first."""
        for name, want, got in (
            ("base_model_id", self.base_model_id, adapter.base_model_id),
            ("base_model_hash", self.base_model_hash, adapter.base_model_hash),
            ("targets", self.targets, adapter.targets),
        ):
            if got != want:
                raise ValueError(f"update {index} has {name} {got!r}; update 0 has {want!r}")
        if adapter.rank == self.rank and len(adapter.tensors) == len(self.tensor_shapes):
            tensors, want_shapes = adapter.tensors, self.tensor_shapes
            if all(
                key in want_shapes and t.shape == want_shapes[key] for key, t in tensors.items()
            ):
                return  # every tensor as in update 0, whose pairs were checked
        shapes = _shapes(adapter, index=index)
        differing = sorted(set(shapes) ^ set(self.shapes))
        if differing:
            which = "lacks" if differing[0] in self.shapes else "has extra"
            raise ValueError(f"update {index} {which} module {differing[0]!r} vs update 0")
        for module, shape in shapes.items():
            if shape != self.shapes[module]:
                raise ValueError(
                    f"update {index} module {module!r} has {_LABELS[len(shape)]} {shape}; "
                    f"update 0 has {self.shapes[module]}"
                )


_LABELS = {2: "(out, in)", 4: "(out, in, kh, kw)"}


def _shapes(adapter: LoraAdapter, *, index: int) -> dict[str, tuple[int, ...]]:
    """Each module's weight shape, after checking its A and B fit together and the key set."""
    modules = adapter.modules
    keys = {m + suffix for m in modules for suffix in (A_SUFFIX, B_SUFFIX)}
    unpaired = sorted(set(adapter.tensors) ^ keys)
    if unpaired:
        raise ValueError(f"update {index} key {unpaired[0]!r} has no lora_A/lora_B partner")
    shapes: dict[str, tuple[int, ...]] = {}
    for module in modules:
        a, b = adapter.tensors[module + A_SUFFIX], adapter.tensors[module + B_SUFFIX]
        fits = a.ndim == b.ndim and a.ndim in _LABELS
        shape = (int(b.shape[0]), *(int(n) for n in a.shape[1:])) if fits else ()
        if not fits or (a.shape, b.shape) != pair_shapes(shape, adapter.rank):
            raise ValueError(
                f"update {index} module {module!r}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                f"do not form a rank-{adapter.rank} linear or conv pair"
            )
        shapes[module] = shape
    return shapes


def _checked_weight(weight: float, index: int) -> float:
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"update {index} has weight {weight}; need finite and >= 0")
    return weight


def _stream(
    updates: Iterable[WeightedUpdate], add: Callable[[LoraAdapter, float, int], None]
) -> tuple[_Reference, float, int]:
    """Check and feed each update to `add` once; return the reference, total weight, count."""
    reference: _Reference | None = None
    total = 0.0
    count = 0
    for index, update in enumerate(updates):
        weight = _checked_weight(update.weight, index)
        if reference is None:
            reference = _Reference.of(update.adapter)
        else:
            reference.check(update.adapter, index=index)
        add(update.adapter, weight, index)
        total += weight
        count += 1
    if reference is None:
        raise ValueError("no updates to aggregate: the iterable was empty")
    if total <= 0:
        raise ValueError(f"the weights of {count} updates sum to {total}; need a positive total")
    return reference, total, count


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float64)


def aggregate_fedavg(updates: Iterable[WeightedUpdate], *, rank: int | None = None) -> LoraAdapter:
    """Generic-FL baseline: the weighted mean of every A and every B, tensor by tensor.

    All updates need one rank (`rank`, or the first update's). The result takes the first
    update's alpha; an update with another alpha has its scale ratio folded into its B first,
    so each averaged B means the same thing. With equal alphas that ratio is 1.
    """
    sums: dict[str, torch.Tensor] = {}
    want: int | None = rank
    scale: float | None = None

    def add(adapter: LoraAdapter, weight: float, index: int) -> None:
        nonlocal want, scale
        want = adapter.rank if want is None else want
        scale = adapter.scale if scale is None else scale
        _check_fedavg_rank(adapter, want=want, index=index)
        for module, a, b in adapter.pairs():
            terms = ((A_SUFFIX, a, weight), (B_SUFFIX, b, weight * adapter.scale / scale))
            for suffix, value, factor in terms:
                key = module + suffix
                term = _float64(value) * factor
                sums[key] = sums[key] + term if key in sums else term

    reference, total, count = _stream(updates, add)
    assert want is not None and scale is not None  # set by the first update
    return LoraAdapter(
        tensors={key: (value / total).float() for key, value in sorted(sums.items())},
        rank=want,
        alpha=scale * want,
        base_model_id=reference.base_model_id,
        base_model_hash=reference.base_model_hash,
        target_modules=reference.target_modules,
        extra={"method": "fedavg", "updates": str(count)},
        targets=reference.targets,
    )


def _check_fedavg_rank(adapter: LoraAdapter, *, want: int, index: int) -> None:
    if adapter.rank != want:
        raise ValueError(
            f"fedavg needs one rank for all updates: update {index} has rank "
            f"{adapter.rank}, expected {want}; use aggregate_exact for mixed ranks"
        )


@dataclass(frozen=True)
class _Kept:
    """One update kept for a later pass: the adapter without its tensors, and their values
    as one float32 row (exact for float16, bfloat16 and float32 tensors)."""

    adapter: LoraAdapter
    layout: tuple[tuple[str, torch.Size, torch.dtype], ...]
    values: torch.Tensor

    @classmethod
    def of(cls, adapter: LoraAdapter) -> _Kept:
        tensors = adapter.tensors
        layout = tuple((key, tensors[key].shape, tensors[key].dtype) for key in sorted(tensors))
        values = torch.cat(
            [tensors[key].detach().reshape(-1).to("cpu", torch.float32) for key, _, _ in layout]
        )
        return cls(replace(adapter, tensors={}), layout, values)

    def restored(self) -> LoraAdapter:
        """The adapter as it was added, each tensor in its own dtype again."""
        tensors: dict[str, torch.Tensor] = {}
        start = 0
        for key, shape, dtype in self.layout:
            end = start + shape.numel()
            tensors[key] = self.values[start:end].view(shape).to(dtype)
            start = end
        return replace(self.adapter, tensors=tensors)


class FedAvgSum:
    """FedAvg fed one update at a time, for weights settled only after every update was read
    (the worker's clip bound, capped weights and robust rules): `add(adapter)` for each, then
    `result(weights, clips)`, so that a source is read a single time.

    The per-tensor means need an update's weight before its tensors can go into the sums, so
    until `result` every added update is kept, as float32 copies of its tensors: in memory up
    to `options.resident_bytes` (4 GiB by default), in a temporary file in `options.spill_dir`
    beyond. That is N x rank x (in + out) x 4 bytes per module, what `ExactSum`'s blocks hold
    for the same updates, where the means themselves need one adapter's size; with weights
    known as each update is read, `aggregate_fedavg` keeps only its running sums.
    """

    def __init__(self, *, rank: int | None = None, options: SketchOptions = DEFAULT_SKETCH) -> None:
        self._rank = rank
        self._options = options
        self._reference: _Reference | None = None
        self._kept: list[_Kept] = []
        self._resident = 0
        self._spill: Spill | None = None

    @property
    def count(self) -> int:
        return len(self._kept)

    @property
    def spilled_bytes(self) -> int:
        """How many bytes of the kept updates went to the temporary file."""
        return 0 if self._spill is None else self._spill.size

    def add(self, adapter: LoraAdapter) -> None:
        """Check one update against the first (and the rank) and keep a copy of its tensors."""
        index = self.count
        if self._reference is None:
            self._reference = _Reference.of(adapter)
            self._rank = adapter.rank if self._rank is None else self._rank
        else:
            self._reference.check(adapter, index=index)
        assert self._rank is not None  # set by the first update
        _check_fedavg_rank(adapter, want=self._rank, index=index)
        kept = _Kept.of(adapter)
        size = kept.values.numel() * 4
        if self._resident + size > self._options.resident_bytes:
            if self._spill is None:
                self._spill = Spill(self._options.spill_dir)
            kept = replace(kept, values=self._spill.keep(kept.values))
        else:
            self._resident += size
        self._kept.append(kept)

    def result(self, weights: Sequence[float], clips: Sequence[float] | None = None) -> LoraAdapter:
        """`aggregate_fedavg` of the kept updates with `weights`, each first scaled by its clip
        factor (in [0, 1]) as `tessera.lora.bounds.clip_update` scales it; an update of weight 0
        is left out. The kept copies are released."""
        try:
            if not self._kept:
                raise ValueError("no updates to aggregate: the iterable was empty")
            clips = [1.0] * self.count if clips is None else clips
            for name, given in (("weights", weights), ("clip factors", clips)):
                if len(given) != self.count:
                    raise ValueError(f"{len(given)} {name} for {self.count} updates")
            checked = [_checked_weight(weight, index) for index, weight in enumerate(weights)]
            for index, clip in enumerate(clips):
                if not 0.0 <= clip <= 1.0:
                    raise ValueError(f"update {index} has clip factor {clip}; need it in [0, 1]")
            total = sum(checked)
            if total <= 0:
                raise ValueError(
                    f"the weights of {self.count} updates sum to {total}; need a positive total"
                )
            terms = zip(self._kept, checked, clips, strict=True)
            return aggregate_fedavg(
                (
                    WeightedUpdate(scaled_update(kept.restored(), clip), weight)
                    for kept, weight, clip in terms
                    if weight > 0
                ),
                rank=self._rank,
            )
        finally:
            self._kept, self._resident = [], 0
            if self._spill is not None:
                self._spill.close()
                self._spill = None


CHUNK_RANK = 256
"""Updates are copied into the maths' blocks in chunks of about this summed rank..."""
CHUNK_BYTES = 64 << 20
"""...or of about this many bytes of factors, whichever comes first (few, large products)."""


def _check_target(rank: int, alpha: float | None) -> float:
    """The result's alpha (default `rank`), after checking rank and alpha."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    alpha = float(rank) if alpha is None else alpha
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    return alpha


def _flat_pairs(adapter: LoraAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {module: adapter.flat_pair(module) for module in adapter.modules}


class _Chunker:
    """Groups (flat pairs, factor) of consecutive updates into chunks of about CHUNK_RANK."""

    def __init__(self) -> None:
        self.pending: list[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]] = []
        self._rank = self._bytes = 0

    def push(self, adapter: LoraAdapter, factor: float) -> bool:
        """Add one update; True when the chunk is full (then `flush` it)."""
        pairs = _flat_pairs(adapter)
        self.pending.append((pairs, factor))
        self._rank += adapter.rank
        self._bytes += sum(a.numel() + b.numel() for a, b in pairs.values()) * 4
        return self._rank >= CHUNK_RANK or self._bytes >= CHUNK_BYTES

    def flush(self) -> Chunk:
        chunk, self.pending, self._rank, self._bytes = self.pending, [], 0, 0
        return chunk


class ExactSum:
    """Exact aggregation fed one update at a time: each is checked and its factors copied into
    the maths' blocks at once (`tessera.lora.lowrank`), so a source is read a single time.

    `add(adapter, weight)`, then `result()`; or, when the weights are settled only after every
    update was read (the worker's clip bound and robust rules), `add(adapter, 1.0,
    norm=...)` and `result(weights)`. With `norm` (the product's norm, finite), the factors are
    stored scaled to a unit product and the norm goes into the weight: no overflow in float32
    for an update whose values are huge but whose weight will scale it down.
    """

    def __init__(
        self,
        *,
        rank: int,
        alpha: float | None = None,
        method: str = "exact",
        options: SketchOptions = DEFAULT_SKETCH,
    ) -> None:
        self._alpha = _check_target(rank, alpha)
        self._rank, self._method, self._options = rank, method, options
        self._chunker = _Chunker()
        self._sum: LowRankSum | None = None
        self._reference: _Reference | None = None
        self._weights: list[float] = []
        self._units: list[float] = []  # per added update: scale times its stored norm factor

    @property
    def count(self) -> int:
        return len(self._weights)

    def add(self, adapter: LoraAdapter, weight: float, *, norm: float | None = None) -> None:
        """Check one update against the first and copy its factors (a chunk at a time)."""
        index = self.count
        weight = _checked_weight(weight, index)
        if self._reference is None:
            self._reference = _Reference.of(adapter)
            shapes = {
                m: (int(b.shape[0]), int(a.shape[1])) for m, (a, b) in _flat_pairs(adapter).items()
            }
            self._sum = LowRankSum(shapes, rank=self._rank, options=self._options)
        else:
            self._reference.check(adapter, index=index)
        unit = adapter.scale
        if norm is not None and math.isfinite(norm) and norm > 0:
            root = math.sqrt(1.0 / norm)
            tensors = {  # at least float32: fp16 uploads would round a second time
                k: (v.double() * root).to(torch.promote_types(v.dtype, torch.float32))
                for k, v in adapter.tensors.items()
            }
            adapter, unit = replace(adapter, tensors=tensors), unit * norm
        self._weights.append(weight)
        self._units.append(unit)
        if weight > 0 or norm is not None:  # a settled weight 0 is left out for good
            assert self._sum is not None
            factor = 0.0 if norm is not None else weight * unit  # with a norm: set in result
            if self._chunker.push(adapter, factor):
                self._sum.add(self._chunker.flush())
        else:
            self._units[-1] = math.nan  # not in the blocks

    def result(
        self, weights: Sequence[float] | None = None, clips: Sequence[float] | None = None
    ) -> ExactResult:
        """The weighted mean re-factorised to `rank`; `weights` replace those given to `add`,
        and `clips` (each in [0, 1]) scale the products without counting in the total."""
        if self._sum is None or self._reference is None:
            raise ValueError("no updates to aggregate: the iterable was empty")
        if weights is not None:
            if len(weights) != self.count:
                raise ValueError(f"{len(weights)} weights for {self.count} updates")
            checked = [_checked_weight(weight, index) for index, weight in enumerate(weights)]
            for index, (weight, unit) in enumerate(zip(checked, self._units, strict=True)):
                if weight > 0 and math.isnan(unit):
                    raise ValueError(f"update {index} was added with weight 0 and no norm")
            self._weights = checked
        total = sum(self._weights)
        if total <= 0:
            raise ValueError(
                f"the weights of {self.count} updates sum to {total}; need a positive total"
            )
        self._sum.add(self._chunker.flush())
        clips = [1.0] * self.count if clips is None else clips  # factors set here (see add)
        terms = zip(self._weights, clips, self._units, strict=True)
        self._sum.reweigh([w * c * u for w, c, u in terms if not math.isnan(u)])
        with one_thread():
            truncated = self._sum.finish()
        return _refactorised(
            truncated,
            total=total,
            reference=self._reference,
            rank=self._rank,
            alpha=self._alpha,
            method=self._method,
            count=self.count,
        )


def _exact(
    updates: Iterable[WeightedUpdate],
    *,
    rank: int,
    alpha: float | None,
    method: str,
    options: SketchOptions,
) -> ExactResult:
    """Read the updates once into an ExactSum; the re-factorised mean."""
    exact = ExactSum(rank=rank, alpha=alpha, method=method, options=options)
    with one_thread():
        for update in updates:
            exact.add(update.adapter, update.weight)
    return exact.result()


def _refactorised(
    truncated: Mapping[str, Truncated],
    *,
    total: float,
    reference: _Reference,
    rank: int,
    alpha: float,
    method: str,
    count: int,
) -> ExactResult:
    """The adapter of each module's truncated sum divided by `total`, singular values split
    evenly as sqrt(S / scale) between B and A, and the share of energy the rank kept."""
    tensors: dict[str, torch.Tensor] = {}
    module_energy: dict[str, float] = {}
    kept_all = total_all = 0.0
    scale = alpha / rank
    for module in sorted(truncated):
        part = truncated[module]
        s = part.singular / total
        k = min(rank, s.numel())
        root = (s[:k] / scale).sqrt()
        a = torch.zeros(rank, part.right.shape[1], dtype=torch.float64)
        b = torch.zeros(part.left.shape[0], rank, dtype=torch.float64)
        a[:k] = root[:, None] * part.right[:k]
        b[:, :k] = part.left[:, :k] * root
        a, b = unflatten_pair(reference.shapes[module], a.float(), b.float())
        tensors[module + A_SUFFIX], tensors[module + B_SUFFIX] = a, b
        energy = part.total_energy / total**2
        kept_energy = float(s[:k].square().sum())
        module_energy[module] = min(1.0, kept_energy / energy) if energy > 0 else 1.0
        kept_all, total_all = kept_all + kept_energy, total_all + max(energy, kept_energy)
    energy_kept = kept_all / total_all if total_all > 0 else 1.0
    extra = {"method": method, "updates": str(count), "energy_kept": f"{energy_kept:.6f}"}
    adapter = LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=reference.base_model_id,
        base_model_hash=reference.base_model_hash,
        target_modules=reference.target_modules,
        extra=extra,
        targets=reference.targets,
    )
    sketched = any(part.estimated for part in truncated.values())
    return ExactResult(adapter, energy_kept, module_energy, sketched=sketched)


def aggregate_exact(
    updates: Iterable[WeightedUpdate],
    *,
    rank: int,
    alpha: float | None = None,
    options: SketchOptions = DEFAULT_SKETCH,
) -> ExactResult:
    """The weighted mean of the updates' products, re-factorised to `rank` (any input ranks).

    Exact while the summed input rank fits `options.exact_rank` (or the sketch spans the whole
    module); beyond, a randomized range finder with `options` (see `tessera.lora.lowrank`).
    The updates are read once (a one-shot iterator will do); their factors are copied into
    blocks, in memory up to `options.resident_bytes`, in a temporary file beyond. The
    result's alpha defaults to `rank` (scale 1);
    singular values are split evenly, as sqrt(S / scale), between B and A.
    """
    return _exact(updates, rank=rank, alpha=alpha, method="exact", options=options)


class PrivateSum:
    """The Gaussian mechanism of `aggregate_private` fed one update at a time: `add` clips
    each update's product into the dense per-module sums at once (so a source is read a single
    time), `result` adds the noise and re-factorises. It holds those sums only, the
    mechanism's own memory (one [out, in] float64 matrix per module), whatever the number of
    updates.
    """

    def __init__(
        self, *, rank: int, clip_norm: float, noise_multiplier: float, alpha: float | None = None
    ) -> None:
        self._alpha = _check_target(rank, alpha)
        for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
            if not math.isfinite(value) or value < 0 or (name == "clip_norm" and value == 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        self._rank, self._clip_norm, self._noise_multiplier = rank, clip_norm, noise_multiplier
        self._sums: dict[str, torch.Tensor] = {}
        self._reference: _Reference | None = None
        self.count = 0

    def add(self, adapter: LoraAdapter, weight: float = 1.0, *, norm: float | None = None) -> None:
        """Check one update (weight 1, like the first) and add its product clipped to
        `clip_norm`; `norm`, the product's norm when the caller has it, saves computing it."""
        index = self.count
        weight = _checked_weight(weight, index)
        if self._reference is None:
            self._reference = _Reference.of(adapter)
        else:
            self._reference.check(adapter, index=index)
        if weight != 1.0:
            raise ValueError(f"update {index} has weight {weight}; a private sum weighs each 1")
        norm = update_norm(adapter) if norm is None else norm
        if not math.isfinite(norm):
            raise ValueError(f"update {index} has a product whose norm is not finite")
        factor = adapter.scale * (min(1.0, self._clip_norm / norm) if norm > 0 else 0.0)
        with one_thread():
            for module, (a, b) in _flat_pairs(adapter).items():
                term = _float64(b) @ _float64(a)
                if module in self._sums:
                    self._sums[module].add_(term, alpha=factor)
                else:
                    self._sums[module] = term.mul_(factor)
        self.count += 1

    def result(self, *, count: int, generator: torch.Generator) -> ExactResult:
        """The noisy sum over `count` (see `aggregate_private`), re-factorised; the sums are
        released."""
        if self._reference is None:
            raise ValueError("no updates to aggregate: the iterable was empty")
        if count < self.count:
            raise ValueError(f"count {count} is below the {self.count} updates summed")
        truncated: dict[str, Truncated] = {}
        std = self._noise_multiplier * self._clip_norm
        with one_thread():
            for module in sorted(self._sums):
                noisy = self._sums.pop(module)
                noisy.add_(
                    torch.randn(noisy.shape, generator=generator, dtype=torch.float64), alpha=std
                )
                left, singular, right = torch.linalg.svd(noisy, full_matrices=False)
                energy = float(singular.square().sum())
                truncated[module] = Truncated(left, singular, right, energy, estimated=False)
        return _refactorised(
            truncated,
            total=float(count),
            reference=self._reference,
            rank=self._rank,
            alpha=self._alpha,
            method="private",
            count=self.count,
        )


def aggregate_private(
    updates: Iterable[WeightedUpdate],
    *,
    rank: int,
    clip_norm: float,
    noise_multiplier: float,
    count: int,
    generator: torch.Generator,
    alpha: float | None = None,
) -> ExactResult:
    """The Gaussian mechanism on the sum of the updates' products, over `count`, at `rank`.

    Each update counts once (weight 1): its product `scale·B·A`, all modules together, is
    clipped here to `clip_norm` in float64 (whatever clipped it before), so one update moves the
    sum by at most `clip_norm` in L2. Every coordinate of every module's sum then gets
    `N(0, (noise_multiplier·clip_norm)^2)` drawn from `generator`, and the noisy sum is divided
    by `count`, a public number (the updates the cluster received: an excluded one counts as a
    zero update). Re-factorising to `rank` (the SVD of each module's dense sum) is
    post-processing and costs no privacy. The noise is dense: it holds one [out, in] float64
    sum per module, the size of the adapted weights (1.7M values for the bundled model; for
    SD-1.5's attention, 93.5M values, 748 MB).
    """
    private = PrivateSum(
        rank=rank, clip_norm=clip_norm, noise_multiplier=noise_multiplier, alpha=alpha
    )
    for update in updates:
        private.add(update.adapter, update.weight)
    return private.result(count=count, generator=generator)


def global_adapter(
    clusters: Iterable[WeightedUpdate],
    *,
    rank: int,
    alpha: float | None = None,
    options: SketchOptions = DEFAULT_SKETCH,
) -> ExactResult:
    """The one adapter for everyone: cluster adapters averaged exactly, weighted by size."""
    return _exact(clusters, rank=rank, alpha=alpha, method="global", options=options)


def neighbour_weights(
    centroids: Mapping[K, torch.Tensor | Sequence[float]], *, temperature: float
) -> dict[K, dict[K, float]]:
    """For each cluster, every cluster's share (its own included): softmax of
    cosine(centroids) / temperature. A cluster is its own closest (cosine 1), so a neighbour
    gets much only when it is nearly as close: dissimilar clusters share next to nothing."""
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    ids = list(centroids)
    if not ids:
        raise ValueError("no centroids given")
    rows = [torch.as_tensor(centroids[c], dtype=torch.float64) for c in ids]
    for c, row in zip(ids, rows, strict=True):
        if row.ndim != 1 or row.shape != rows[0].shape or row.numel() == 0:
            raise ValueError(
                f"centroid of cluster {c!r} has shape {tuple(row.shape)}; "
                f"need one non-empty vector like cluster {ids[0]!r} {tuple(rows[0].shape)}"
            )
        if not bool(torch.isfinite(row).all()):
            raise ValueError(f"centroid of cluster {c!r} has non-finite values")
    unit = torch.stack(rows)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    probs = torch.softmax((unit @ unit.T) / temperature, dim=1)
    return {c: {j: float(probs[i, n]) for n, j in enumerate(ids)} for i, c in enumerate(ids)}


def neighbour_blend(
    clusters: Mapping[K, LoraAdapter],
    centroids: Mapping[K, torch.Tensor | Sequence[float]],
    *,
    lam: float,
    temperature: float,
    rank: int,
    alpha: float | None = None,
    options: SketchOptions = DEFAULT_SKETCH,
) -> dict[K, ExactResult]:
    """Each cluster's adapter mixed with its neighbours': (1 - lam) own + lam * the
    similarity-weighted mix of all clusters (`neighbour_weights`, itself included).

    So lam caps what a cluster takes from the others, and it takes that much only from
    neighbours as close as itself. The mix is exact on the products and re-factorised to
    `rank`. With lam = 0 or a single cluster, each adapter comes back as is.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    for c in [*clusters, *centroids]:
        if c not in clusters or c not in centroids:
            raise ValueError(f"cluster {c!r} needs both an adapter and a centroid")
    weights = neighbour_weights(centroids, temperature=temperature)
    if lam == 0 or len(clusters) == 1:
        return {c: ExactResult(adapter=adapter, energy_kept=1.0) for c, adapter in clusters.items()}
    blended: dict[K, ExactResult] = {}
    for c in clusters:
        mix = [
            WeightedUpdate(clusters[j], lam * p + (1.0 - lam if j == c else 0.0))
            for j, p in weights[c].items()
        ]
        result = _exact(mix, rank=rank, alpha=alpha, method="neighbour_blend", options=options)
        extra = {**result.adapter.extra, "lam": str(lam), "temperature": str(temperature)}
        blended[c] = replace(result, adapter=replace(result.adapter, extra=extra))
    return blended
