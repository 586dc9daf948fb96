"""Aggregating a round's grouped updates into the adapters it publishes (no database here).

Updates stream from the object store (a few read ahead by threads) into the aggregation maths,
which reads them once per pass and keeps none; an update whose object is missing, fails its
sha256, does not parse, or does not match the round's other updates (base model, modules,
shapes; for fedavg, the round's rank) is excluded and the rest aggregate.

Choices:
- scope `global`: all updates form one group; only the `global` adapter is published.
- scope `cluster`, method `exact`: the global adapter is `global_adapter` over the cluster
  adapters before neighbour blending, weighted by their clusters' samples.
- scope `cluster`, method `fedavg`: the global adapter is the fedavg of the same pre-blend
  cluster adapters, weighted by samples. Per-tensor averaging is linear, so this *is* the fedavg
  of all included updates (the generic-FL baseline), without reading every update twice.
- Knowledge interaction (`lam` > 0) blends the cluster adapters for either method; lam = 0
  leaves pure per-cluster aggregates. A cluster without a centroid is left unblended.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch

from services.worker.publishing import ToPublish
from tessera.federation import GLOBAL_ADAPTER, RoundConfig, cluster_adapter_name
from tessera.lora import LoraAdapter, LoraFileError, adapter_from_bytes
from tessera.lora.adapter import A_SUFFIX, B_SUFFIX
from tessera.lora.aggregate import (
    WeightedUpdate,
    aggregate_exact,
    aggregate_fedavg,
    global_adapter,
    neighbour_blend,
)
from tessera.metrics import AGGREGATION_SECONDS
from tessera.models import AdapterKind
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


@dataclass(frozen=True)
class Exclusion:
    """An update left out of the round, and why."""

    update_id: int
    client_id: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"update_id": self.update_id, "client_id": self.client_id, "reason": self.reason}


@dataclass(frozen=True)
class RoundPlan:
    """A round's updates grouped by cluster label (None: the single group of scope global)."""

    round_id: int
    config: RoundConfig
    opened_at: datetime
    clustering_id: int | None
    groups: dict[int | None, list[UpdateRef]]
    centroids: dict[int, torch.Tensor]
    unassigned: list[Exclusion] = field(default_factory=list)


@dataclass(frozen=True)
class RoundAggregate:
    """What a round publishes, which updates went in, which were left out, per-group notes."""

    outputs: list[ToPublish]
    used: list[int]
    excluded: list[Exclusion]
    clusters: list[dict[str, Any]]


@dataclass(frozen=True)
class _Group:
    """One group's aggregated adapter and the updates that went into it."""

    label: int | None
    adapter: LoraAdapter
    energy_kept: float | None
    used: tuple[UpdateRef, ...]
    excluded: int

    @property
    def samples(self) -> int:
        return sum(ref.num_samples for ref in self.used)


class _Compatibility:
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


PREFETCH = 4
"""Updates read from the object store ahead of the maths, each by its own thread."""


class _UpdateStream:
    """A group's updates read from the object store, a few ahead; bad ones are skipped.

    Re-iterable: the first pass decides which updates are used (and records the others as
    excluded); each later pass (the exact maths reads the updates a few times, never keeping
    them) reads the used ones again, and fails if one no longer reads as it did.
    """

    def __init__(
        self,
        refs: Sequence[UpdateRef],
        *,
        store: ObjectStore,
        compatibility: _Compatibility,
        excluded: list[Exclusion],
    ) -> None:
        self._refs = refs
        self._store = store
        self._compatibility = compatibility
        self._excluded = excluded
        self._read = False
        self.used: list[UpdateRef] = []
        self.skipped = 0

    def __iter__(self) -> Iterator[WeightedUpdate]:
        if self._read:
            yield from self._again()
            return
        self._read = True
        for ref, (adapter, reason) in _prefetched(self._refs, self._load):
            if adapter is not None:
                reason = self._compatibility.problem(adapter) or ""
            if adapter is None or reason:
                log.warning(
                    "update excluded",
                    extra={"update_id": ref.id, "client_id": ref.client_id, "reason": reason},
                )
                self._excluded.append(Exclusion(ref.id, ref.client_id, reason))
                self.skipped += 1
                continue
            self.used.append(ref)
            yield WeightedUpdate(adapter, float(ref.num_samples))

    def _again(self) -> Iterator[WeightedUpdate]:
        for ref, (adapter, reason) in _prefetched(self.used, self._load):
            if adapter is None:
                raise RuntimeError(f"update {ref.id} changed while the round aggregated: {reason}")
            yield WeightedUpdate(adapter, float(ref.num_samples))

    def _load(self, ref: UpdateRef) -> tuple[LoraAdapter | None, str]:
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


def aggregate_plan(plan: RoundPlan, *, store: ObjectStore) -> RoundAggregate:
    """Aggregate every group at quorum, then blend and build the global adapter."""
    config = plan.config
    excluded = list(plan.unassigned)
    clusters: list[dict[str, Any]] = []
    groups: dict[int | None, _Group] = {}
    compatibility = _Compatibility(rank=config.rank if config.method == "fedavg" else None)
    quorum = max(1, config.min_updates_per_cluster) if config.scope == "cluster" else 1
    for label in sorted(plan.groups, key=lambda value: -1 if value is None else value):
        refs = plan.groups[label]
        group = None
        if len(refs) >= quorum:  # a group below quorum is not even read
            stream = _UpdateStream(
                refs, store=store, compatibility=compatibility, excluded=excluded
            )
            group = _aggregate_group(label, stream, config=config)
        used = len(group.used) if group else 0
        note: dict[str, Any] = {"label": label, "updates": len(refs), "used": used}
        if group is None or used < quorum:
            reason = f"below quorum: {used} usable of {len(refs)} updates < {quorum}"
            seen = {e.update_id for e in excluded}
            excluded += [Exclusion(r.id, r.client_id, reason) for r in refs if r.id not in seen]
            clusters.append({**note, "samples": 0, "published": False, "reason": reason})
            continue
        groups[label] = group
        clusters.append({**note, "samples": group.samples, "published": True, "reason": None})
    return RoundAggregate(
        outputs=_outputs(plan, groups),
        used=[ref.id for group in groups.values() for ref in group.used],
        excluded=excluded,
        clusters=clusters,
    )


def _aggregate_group(
    label: int | None, stream: _UpdateStream, *, config: RoundConfig
) -> _Group | None:
    """The group's aggregate, or None when none of its updates could be read."""
    started = time.perf_counter()
    try:
        if config.method == "exact":
            result = aggregate_exact(stream, rank=config.rank)
            adapter, energy = result.adapter, result.energy_kept
        else:
            adapter, energy = aggregate_fedavg(stream, rank=config.rank), None
    except ValueError:
        if stream.used:
            raise
        return None  # every update was excluded: the maths saw an empty stream
    AGGREGATION_SECONDS.observe(time.perf_counter() - started)
    return _Group(label, adapter, energy, tuple(stream.used), excluded=stream.skipped)


def _outputs(plan: RoundPlan, groups: dict[int | None, _Group]) -> list[ToPublish]:
    """The adapters to publish: one per cluster (blended with its neighbours) and the global."""
    config = plan.config
    if not groups:
        return []
    common = {"method": config.method, "scope": config.scope, "clustering_id": plan.clustering_id}
    if config.scope == "global":
        (group,) = groups.values()
        metrics = {**common, **_usage(group.used), "energy_kept": group.energy_kept}
        return [ToPublish(GLOBAL_ADAPTER, AdapterKind.GLOBAL, None, group.adapter, metrics)]
    clusters = {label: group for label, group in groups.items() if label is not None}
    blended = _blend(clusters, plan.centroids, config)
    outputs = []
    for label, group in sorted(clusters.items()):
        adapter, blend_energy = blended[label]
        metrics = {
            **common,
            **_usage(group.used),
            "cluster_label": label,
            "energy_kept": group.energy_kept,
            "excluded": group.excluded,
            "lam": config.lam,
            "temperature": config.temperature,
            "blend_energy_kept": blend_energy,
        }
        name = cluster_adapter_name(label)
        outputs.append(ToPublish(name, AdapterKind.CLUSTER, label, adapter, metrics))
    weighted = [WeightedUpdate(group.adapter, float(group.samples)) for group in clusters.values()]
    if config.method == "exact":
        result = global_adapter(weighted, rank=config.rank)
        adapter, energy = result.adapter, result.energy_kept
    else:
        adapter, energy = aggregate_fedavg(weighted, rank=config.rank), None
    used = [ref for group in clusters.values() for ref in group.used]
    metrics = {**common, **_usage(used), "energy_kept": energy, "clusters": sorted(clusters)}
    outputs.append(ToPublish(GLOBAL_ADAPTER, AdapterKind.GLOBAL, None, adapter, metrics))
    return outputs


def _blend(
    clusters: dict[int, _Group], centroids: dict[int, torch.Tensor], config: RoundConfig
) -> dict[int, tuple[LoraAdapter, float | None]]:
    """Each cluster's adapter with its neighbours' share mixed in; unchanged when lam is 0."""
    out: dict[int, tuple[LoraAdapter, float | None]] = {
        label: (group.adapter, None) for label, group in clusters.items()
    }
    placed = [label for label in clusters if label in centroids]
    if config.lam == 0 or len(placed) < 2:
        return out
    results = neighbour_blend(
        {label: clusters[label].adapter for label in placed},
        {label: centroids[label] for label in placed},
        lam=config.lam,
        temperature=config.temperature,
        rank=config.rank,
    )
    for label, result in results.items():
        out[label] = (result.adapter, result.energy_kept)
    return out


def _usage(refs: Sequence[UpdateRef]) -> dict[str, Any]:
    losses = [
        r.train_loss for r in refs if r.train_loss is not None and math.isfinite(r.train_loss)
    ]
    return {
        "updates": len(refs),
        "samples": sum(r.num_samples for r in refs),
        "mean_train_loss": sum(losses) / len(losses) if losses else None,
    }
