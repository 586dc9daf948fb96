"""Aggregating a round's grouped updates into the adapters it publishes (no database here).

Updates stream from the object store (a few read ahead by threads), each read once: the survey
that checks and bounds them (`services.worker.updates`) hands each usable one to the method's
maths, which applies the weights and clip factors settled after the last. Exact copies its
factors into its blocks and fedavg keeps a float32 copy of its tensors (in memory up to 4 GiB,
beyond in a temporary file under TMPDIR); a private round adds its clipped product to the
dense per-module sums, the mechanism's own memory. An update whose
object is missing, fails its sha256, does not parse, does not match the round's other updates
(base model, modules, shapes; for fedavg, the round's rank), has a LoRA scale out of range or
a non-finite norm is excluded and the rest aggregate, each clipped to the group's norm bound
and weighed with a capped weight. A group whose aggregate cannot be computed, and any adapter
that is not finite and fp16-safe, is withheld with its reason instead of failing the round.

Choices:
- scope `global`: all updates form one group; only the `global` adapter is published.
- scope `cluster`, method `exact`: the global adapter is `global_adapter` over the cluster
  adapters before neighbour blending, weighted by their updates' capped weights.
- scope `cluster`, method `fedavg`: the global adapter is the fedavg of the same pre-blend
  cluster adapters, weighted the same way. Per-tensor averaging is linear, so this *is* the fedavg
  of all included updates (the generic-FL baseline), without reading every update twice.
- A private round (`noise_multiplier`): each cluster's aggregate is the Gaussian mechanism on
  the sum of its clipped products (`aggregate_private`); blending and the global adapter are
  post-processing of the noisy cluster adapters.
- Knowledge interaction (`lam` > 0) blends the cluster adapters for either method; lam = 0
  leaves pure per-cluster aggregates. A cluster without a centroid is left unblended.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import torch

from services.worker.publishing import ToPublish
from services.worker.updates import BoundedUpdates, Compatibility, Exclusion, UpdateRef
from tessera.federation import GLOBAL_ADAPTER, RoundConfig, cluster_adapter_name
from tessera.lora import LoraAdapter
from tessera.lora.aggregate import (
    ExactSum,
    FedAvgSum,
    PrivateSum,
    WeightedUpdate,
    aggregate_fedavg,
    global_adapter,
    neighbour_blend,
)
from tessera.lora.bounds import ScaleRange, publish_problem
from tessera.lora.lowrank import DEFAULT_SKETCH, SketchOptions
from tessera.metrics import AGGREGATION_SECONDS
from tessera.models import AdapterKind
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)

__all__ = ["Exclusion", "RoundAggregate", "RoundPlan", "UpdateRef", "aggregate_plan"]


@dataclass(frozen=True)
class RoundPlan:
    """A round's updates grouped by cluster label (None: the single group of scope global)."""

    round_id: int
    config: RoundConfig
    opened_at: datetime
    clustering_id: int | None
    groups: dict[int | None, list[UpdateRef]]
    centroids: dict[int, torch.Tensor]
    unassigned: list[Exclusion] = field(default_factory=list)  # left out before reading


@dataclass(frozen=True)
class RoundAggregate:
    """What a round publishes, which updates went in, which were left out, per-group notes."""

    outputs: list[ToPublish]
    used: list[int]
    excluded: list[Exclusion]
    clusters: list[dict[str, Any]]
    withheld: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Group:
    """One group's aggregated adapter and the updates that went into it."""

    label: int | None
    adapter: LoraAdapter
    energy_kept: float | None
    used: tuple[UpdateRef, ...]
    excluded: int
    clipped: int
    clip_bound: float | None
    weight: float  # the sum of its updates' capped weights: its share of the global adapter
    seconds: float  # reading, bounding and aggregating its updates

    @property
    def samples(self) -> int:
        return sum(ref.num_samples for ref in self.used)


class _GroupFailedError(Exception):
    """A group's updates were read, but no adapter can be published from them."""


def aggregate_plan(
    plan: RoundPlan, *, store: ObjectStore, scales: ScaleRange, noise_seed: int | None = None
) -> RoundAggregate:
    """Aggregate every group at quorum, then blend, build the global adapter and check them.

    A private round's noise comes from a generator seeded from the OS's randomness (`secrets`);
    `noise_seed` fixes it, for tests only.
    """
    config = plan.config
    seed = secrets.randbits(63) if noise_seed is None else noise_seed
    noise = torch.Generator().manual_seed(seed)
    excluded = list(plan.unassigned)
    clusters: list[dict[str, Any]] = []
    groups: dict[int | None, _Group] = {}
    compatibility = Compatibility(rank=config.rank if config.method == "fedavg" else None)
    quorum = max(1, config.min_updates_per_cluster) if config.scope == "cluster" else 1
    for label in sorted(plan.groups, key=lambda value: -1 if value is None else value):
        refs = plan.groups[label]
        group = None
        failure = None
        if len(refs) >= quorum:  # a group below quorum is not even read
            stream = BoundedUpdates(
                refs,
                store=store,
                compatibility=compatibility,
                scales=scales,
                config=config,
                excluded=excluded,
                seed=plan.round_id,
            )
            try:
                group = _aggregate_group(label, stream, config=config, noise=noise)
            except _GroupFailedError as error:
                failure = str(error)
        used = len(group.used) if group else 0
        note: dict[str, Any] = {"label": label, "updates": len(refs), "used": used}
        if failure is not None or group is None or used < quorum:
            reason = failure or f"below quorum: {used} usable of {len(refs)} updates < {quorum}"
            _exclude_rest(excluded, refs, reason)
            clusters.append({**note, "samples": 0, "published": False, "reason": reason})
            continue
        groups[label] = group
        clusters.append(
            {
                **note,
                "samples": group.samples,
                "clipped": group.clipped,
                "clip_bound": group.clip_bound,
                "noise_multiplier": config.noise_multiplier,
                "energy_kept": group.energy_kept,
                "seconds": round(group.seconds, 3),
                "published": True,
                "reason": None,
            }
        )
    outputs, withheld = _checked(_outputs(plan, groups), groups, excluded, clusters)
    return RoundAggregate(
        outputs=outputs,
        used=[ref.id for group in groups.values() for ref in group.used],
        excluded=excluded,
        clusters=clusters,
        withheld=withheld,
    )


def sketch_options(config: RoundConfig) -> SketchOptions:
    """The exact path's options for a round: the defaults, with the round's power passes."""
    return replace(DEFAULT_SKETCH, power_passes=config.power_passes)


def _exclude_rest(excluded: list[Exclusion], refs: Sequence[UpdateRef], reason: str) -> None:
    """Exclude, with `reason`, each of `refs` not excluded already."""
    seen = {e.update_id for e in excluded}
    excluded += [Exclusion(r.id, r.client_id, reason) for r in refs if r.id not in seen]


def _checked(
    outputs: list[ToPublish],
    groups: dict[int | None, _Group],
    excluded: list[Exclusion],
    clusters: list[dict[str, Any]],
) -> tuple[list[ToPublish], list[dict[str, Any]]]:
    """The outputs that are finite and fp16-safe; a withheld cluster's updates are excluded."""
    kept: list[ToPublish] = []
    withheld: list[dict[str, Any]] = []
    for output in outputs:
        problem = publish_problem(output.adapter)
        if problem is None:
            kept.append(output)
            continue
        reason = f"adapter {output.name} withheld: {problem}"
        log.error("adapter withheld", extra={"adapter": output.name, "reason": reason})
        withheld.append({"adapter": output.name, "reason": reason})
        is_cluster = output.kind == AdapterKind.CLUSTER
        group = groups.pop(output.cluster_label, None) if is_cluster else None
        if group is not None:
            _exclude_rest(excluded, group.used, reason)
            for note in clusters:
                if note["label"] == output.cluster_label:
                    note.update(published=False, reason=reason)
    return kept, withheld


def _aggregate_group(
    label: int | None, stream: BoundedUpdates, *, config: RoundConfig, noise: torch.Generator
) -> _Group | None:
    """The group's aggregate, or None when none of its updates could be read.

    The survey hands each usable update to the method's maths (`_ReadOnce`), so the group is
    read once; the weights and clip factors settled after it go into the result. A private
    round's aggregate is the Gaussian mechanism on the sum of the clipped products, divided by
    the number of updates the group received (an excluded one counts as zero).
    """
    started = time.perf_counter()
    maths = _ReadOnce(config)
    stream.survey(maths.keep)
    try:
        weights, clips = stream.settled()
        adapter, energy = maths.result(weights, clips, count=stream.received, noise=noise)
    except (ValueError, RuntimeError) as error:  # torch's LinAlgError is a RuntimeError
        if not stream.used:
            return None  # every update was excluded: the maths saw no update
        log.exception("a group's aggregation failed", extra={"label": label})
        raise _GroupFailedError(
            f"the cluster's aggregate could not be computed ({type(error).__name__.lstrip('_')})"
        ) from error
    seconds = time.perf_counter() - started
    AGGREGATION_SECONDS.observe(seconds)
    problem = publish_problem(adapter)
    if problem is not None:  # never blended into others, nor into the global adapter
        raise _GroupFailedError(f"the cluster's aggregate is not publishable: {problem}")
    return _Group(
        label,
        adapter,
        energy,
        tuple(stream.used),
        excluded=stream.skipped,
        clipped=stream.clipped,
        clip_bound=stream.bound,
        weight=stream.total_weight,
        seconds=seconds,
    )


class _ReadOnce:
    """A round method's maths fed by the survey, one usable update at a time.

    Exact copies each update's factors (scaled to a unit product, its norm in the weight),
    fedavg keeps a float32 copy of its tensors (its per-tensor means need the weights first;
    as many bytes as exact's blocks: `FedAvgSum`), a private round adds its clipped product to
    the dense sums. The first error of an `add` is raised by `result`, as the maths' own are.
    """

    def __init__(self, config: RoundConfig) -> None:
        self._problems: list[ValueError] = []
        self._exact: ExactSum | None = None
        self._fedavg: FedAvgSum | None = None
        self._private: PrivateSum | None = None
        if config.noise_multiplier is not None:
            assert config.clip_norm is not None  # RoundConfig requires clip fixed
            self._private = PrivateSum(
                rank=config.rank,
                clip_norm=config.clip_norm,
                noise_multiplier=config.noise_multiplier,
            )
        elif config.method == "exact":
            self._exact = ExactSum(rank=config.rank, options=sketch_options(config))
        else:
            self._fedavg = FedAvgSum(rank=config.rank)

    def keep(self, adapter: LoraAdapter, norm: float) -> None:
        if self._problems:
            return
        try:
            if self._exact is not None:
                self._exact.add(adapter, 1.0, norm=norm)
            elif self._fedavg is not None:
                self._fedavg.add(adapter)
            else:
                assert self._private is not None
                self._private.add(adapter, norm=norm)  # clips to clip_norm itself
        except ValueError as error:
            self._problems.append(error)

    def result(
        self,
        weights: Sequence[float],
        clips: Sequence[float],
        *,
        count: int,
        noise: torch.Generator,
    ) -> tuple[LoraAdapter, float | None]:
        """The group's adapter and the energy its rank kept (None for fedavg); `count`: the
        updates the group received, a private mean's divisor."""
        if self._problems:
            raise self._problems[0]
        if self._exact is not None:
            result = self._exact.result(weights, clips)
            return result.adapter, result.energy_kept
        if self._fedavg is not None:
            return self._fedavg.result(weights, clips), None
        assert self._private is not None
        if any(weight != 1.0 for weight in weights):  # RoundConfig: weighting equal, no discount
            raise ValueError("a private round weighs each update 1")
        result = self._private.result(count=count, generator=noise)
        return result.adapter, result.energy_kept


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
            "clipped": group.clipped,
            "clip_bound": group.clip_bound,
            "weighting": config.weighting,
            "staleness_exponent": config.staleness_exponent,
            "robust": config.robust,
            "noise_multiplier": config.noise_multiplier,
            "lam": config.lam,
            "temperature": config.temperature,
            "blend_energy_kept": blend_energy,
        }
        name = cluster_adapter_name(label)
        outputs.append(ToPublish(name, AdapterKind.CLUSTER, label, adapter, metrics))
    weighted = [WeightedUpdate(group.adapter, group.weight) for group in clusters.values()]
    if config.method == "exact":
        result = global_adapter(weighted, rank=config.rank, options=sketch_options(config))
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
        options=sketch_options(config),
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
        "stale_updates": sum(r.staleness > 0 for r in refs),
        "samples": sum(r.num_samples for r in refs),
        "mean_train_loss": sum(losses) / len(losses) if losses else None,
    }
