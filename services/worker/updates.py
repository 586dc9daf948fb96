"""A group's updates as the aggregation maths sees them: read, checked, bounded, weighted.

The survey reads each update, checks it (readable, compatible with the round's others, a LoRA
scale within TESSERA_MIN/MAX_LORA_SCALE, a finite product norm), keeps its norm and hands the
update to a `keep` callback: the worker's maths (exact, fedavg or private) takes it then, and
`settled` gives the weights, clip factors included, once the group's clip bound and capped
weights follow from the norms (each update is clipped by its factor, `tessera.lora.bounds`).
An update that fails a check is excluded with the reason, and the rest aggregate.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from tessera.federation import RoundConfig
from tessera.lora import LoraAdapter, LoraFileError, adapter_from_bytes
from tessera.lora.adapter import A_SUFFIX, B_SUFFIX
from tessera.lora.bounds import (
    ScaleRange,
    capped_weights,
    clip_bound,
    staleness_discount,
    update_norm,
)
from tessera.lora.robust import Sketcher, multi_krum, norm_outliers, trimmed_by_median
from tessera.storage import ChecksumMismatchError, ObjectNotFoundError, ObjectStore

log = logging.getLogger(__name__)
_Loaded = tuple[LoraAdapter | None, str]


@dataclass(frozen=True)
class UpdateRef:
    """What aggregation needs of an Update row, read once so no session stays open."""

    id: int
    client_id: int
    object_key: str
    sha256: str
    num_samples: int
    train_loss: float | None
    staleness: int = 0  # versions its base adapter was behind that adapter's newest


@dataclass(frozen=True)
class Exclusion:
    """An update left out of the round, and why."""

    update_id: int
    client_id: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"update_id": self.update_id, "client_id": self.client_id, "reason": self.reason}


class Compatibility:
    """The first readable update fixes base model, modules and their shapes; others must match."""

    def __init__(self, *, rank: int | None) -> None:
        self._rank = rank
        self._signature: tuple[object, ...] | None = None

    def problem(self, adapter: LoraAdapter) -> str | None:
        if self._rank is not None and adapter.rank != self._rank:
            return (
                f"rank {adapter.rank}; fedavg needs every update at the round's rank {self._rank}"
            )
        modules = adapter.modules
        if set(adapter.tensors) != {m + s for m in modules for s in (A_SUFFIX, B_SUFFIX)}:
            return "a lora_A or lora_B tensor has no partner"
        shapes = []
        for module, a, b in adapter.pairs():
            linear = a.ndim == 2 and b.ndim == 2
            conv = a.ndim == 4 and b.ndim == 4 and tuple(b.shape[2:]) == (1, 1)
            if not (linear or conv) or adapter.rank != a.shape[0] or adapter.rank != b.shape[1]:
                return f"module {module!r} does not hold a rank-{adapter.rank} pair"
            if not (bool(a.isfinite().all()) and bool(b.isfinite().all())):
                return f"module {module!r} has non-finite values"
            shapes.append((module, tuple(b.shape[:1]) + tuple(a.shape[1:])))
        signature = (
            adapter.base_model_id,
            adapter.base_model_hash,
            adapter.targets,
            tuple(shapes),
        )
        if self._signature is None:
            self._signature = signature
        elif signature != self._signature:
            return "base model, target preset, modules or shapes differ from the other updates"
        return None


class BoundedUpdates:
    """A group's usable updates, each clipped to the group's norm bound with a capped weight.

    Call `survey(keep)`, which reads each update once (a few ahead, by threads) and hands it
    to the maths, then `settled()` for the weights of the updates `keep` took.
    """

    def __init__(
        self,
        refs: Sequence[UpdateRef],
        *,
        store: ObjectStore,
        compatibility: Compatibility,
        scales: ScaleRange,
        config: RoundConfig,
        excluded: list[Exclusion],
        seed: int = 0,
    ) -> None:
        self._refs = refs
        sketched = config.robust in ("trimmed", "krum")
        self._sketcher = Sketcher(seed=seed) if sketched else None
        self._sketches: dict[int, torch.Tensor] = {}
        self._store = store
        self._compatibility = compatibility
        self._scales = scales
        self._config = config
        self._excluded = excluded
        self._norms: dict[int, float] = {}
        self._weights: dict[int, float] = {}
        self.used: list[UpdateRef] = []
        self.skipped = 0
        self.clipped = 0
        self.total_weight = 0.0
        self.bound: float | None = None
        self._kept: list[UpdateRef] = []

    @property
    def received(self) -> int:
        """How many updates the group received, usable or not."""
        return len(self._refs)

    def survey(self, keep: Callable[[LoraAdapter, float], None] | None = None) -> None:
        """First pass: check every update, keep its norm; fix the clip bound and the weights.

        `keep(adapter, norm)` receives every update that passed the checks, in order (the
        maths takes it then, so the group is read once; `settled` gives their weights
        afterwards)."""
        for ref, (adapter, reason) in _prefetched(self._refs, self._read):
            if adapter is not None:
                reason = self._compatibility.problem(adapter) or self._scales.problem(adapter) or ""
                norm = update_norm(adapter) if not reason else math.nan
                if math.isfinite(norm):
                    self._norms[ref.id] = norm
                    if self._sketcher is not None:
                        self._sketches[ref.id] = self._sketcher.sketch(adapter)
                    if keep is not None:
                        self._kept.append(ref)
                        keep(adapter, norm)
                    continue
                reason = reason or "the norm of its product scale·B·A is not finite"
            self.exclude(ref, reason)
        usable = [ref for ref in self._refs if ref.id in self._norms]
        if not usable:
            return
        config = self._config
        self.bound = clip_bound(
            list(self._norms.values()),
            mode=config.clip,
            norm=config.clip_norm,
            multiplier=config.clip_multiplier,
        )
        usable = self._select(usable)
        weights = capped_weights(
            [ref.num_samples for ref in usable],
            weighting=config.weighting,
            max_ratio=config.max_weight_ratio,
        )
        exponent = config.staleness_exponent
        self._weights = {
            ref.id: weight * staleness_discount(ref.staleness, exponent=exponent)
            for ref, weight in zip(usable, weights, strict=True)
        }

    def _select(self, usable: list[UpdateRef]) -> list[UpdateRef]:
        """The updates the round's robust rule keeps (on their norms, or their clipped
        sketches); the rest are excluded with the rule's reason."""
        config = self._config
        if config.robust == "none" or not usable:
            return usable
        if config.robust == "norm":
            ratio = config.robust_norm_ratio
            kept = norm_outliers([self._norms[ref.id] for ref in usable], ratio=ratio)
            reason = f"rejected by the norm rule: its norm is over {ratio:g} times the median"
            return self._keep(usable, kept, reason)
        assert self.bound is not None
        sketches = torch.stack(
            [
                self._sketches.pop(ref.id) * min(1.0, self.bound / max(self._norms[ref.id], 1e-300))
                for ref in usable
            ]
        )
        if config.robust == "krum":
            kept = multi_krum(sketches, f=config.robust_f)
            reason = f"rejected by Multi-Krum (f={config.robust_f}): too far from the others"
        else:
            kept = trimmed_by_median(sketches, trim=config.robust_trim)
            reason = (
                f"rejected by the trimmed rule: among the {config.robust_trim:.0%} of the "
                "cluster farthest from its median"
            )
        return self._keep(usable, kept, reason)

    def _keep(self, usable: list[UpdateRef], kept: list[int], reason: str) -> list[UpdateRef]:
        """`usable` at the indices `kept`; the others are excluded with `reason`."""
        chosen = {usable[i].id for i in kept}
        for ref in usable:
            if ref.id not in chosen:
                del self._norms[ref.id]
                self.exclude(ref, reason)
        return [ref for ref in usable if ref.id in chosen]

    def settled(self) -> tuple[list[float], list[float]]:
        """The weight and clip factor of each update `survey` gave to `keep` (weight 0 for one
        a robust rule left out); records them as used and counts the clipped ones."""
        weights: list[float] = []
        clips: list[float] = []
        for ref in self._kept:
            if ref.id not in self._weights or ref.id not in self._norms:
                weights.append(0.0)
                clips.append(0.0)
                continue
            assert self.bound is not None
            norm = self._norms[ref.id]
            factor = min(1.0, self.bound / norm) if norm > 0 else 1.0
            self.clipped += factor < 1.0
            self.used.append(ref)
            self.total_weight += self._weights[ref.id]
            weights.append(self._weights[ref.id])
            clips.append(factor)
        return weights, clips

    def exclude(self, ref: UpdateRef, reason: str) -> None:
        """Leave `ref` out of the round, logging and recording why."""
        log.warning(
            "update excluded",
            extra={"update_id": ref.id, "client_id": ref.client_id, "reason": reason},
        )
        self._excluded.append(Exclusion(ref.id, ref.client_id, reason))
        self.skipped += 1

    def _read(self, ref: UpdateRef) -> _Loaded:
        if ref.num_samples <= 0:
            return None, f"num_samples is {ref.num_samples}; an update needs at least 1"
        try:
            data = self._store.get_bytes(ref.object_key, expected_sha256=ref.sha256)
            return adapter_from_bytes(data), ""
        except ObjectNotFoundError:
            return None, f"object {ref.object_key!r} is missing"
        except ChecksumMismatchError as error:
            return None, f"object {ref.object_key!r} fails its sha256 (found {error.found})"
        except LoraFileError as error:
            return None, f"object {ref.object_key!r} is not a readable adapter: {error}"


PREFETCH = 4
"""Updates read from the object store ahead of the maths, each by its own thread."""


def _prefetched(
    refs: Sequence[UpdateRef], load: Callable[[UpdateRef], _Loaded]
) -> Iterator[tuple[UpdateRef, _Loaded]]:
    """(ref, load(ref)) in order, with up to PREFETCH loads running ahead in threads."""
    with ThreadPoolExecutor(PREFETCH, thread_name_prefix="update-read") as pool:
        ahead: deque[tuple[UpdateRef, Future[_Loaded]]] = deque()
        for ref in refs:
            ahead.append((ref, pool.submit(load, ref)))
            if len(ahead) > PREFETCH:
                done, future = ahead.popleft()
                yield done, future.result()
        while ahead:
            done, future = ahead.popleft()
            yield done, future.result()
