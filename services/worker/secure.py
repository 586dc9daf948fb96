"""Unmasking a secure round: per ready cluster, the sum of its survivors' inputs, never one input.

The masked inputs of U3 are added mod 2^32 as they stream from the object store (one at a
time, none kept), the secrets of the protocol are rebuilt from U4's shares, the leftover masks
removed (`tessera.secagg.protocol.unmask_sum`), and the fixed-point sum decoded: the weighted
sum of B and, last, the sum of the weights. The cluster adapter is the frozen A of the group's
seed with `B = sum(w B) / sum(w)`: exactly the weighted mean of the survivors' products. The
global adapter is the exact average of the cluster adapters, weighted by their weight sums.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.worker.aggregation import RoundAggregate, RoundPlan, sketch_options
from services.worker.publishing import ToPublish
from tessera.federation import GLOBAL_ADAPTER, RoundConfig, cluster_adapter_name
from tessera.lora import LoraAdapter, LoraSpec
from tessera.lora.aggregate import WeightedUpdate, global_adapter
from tessera.lora.bounds import publish_problem, update_norm
from tessera.models import AdapterKind, SecAggGroup, SecAggMember, SecAggPhase
from tessera.secagg.protocol import Peer, ProtocolError, Reveal, group_context, unmask_sum
from tessera.secagg.vector import FixedPoint, frozen_a, frozen_adapter, unflatten_b, vector_length
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Ready:
    """What the unmasking of one ready group needs from the database."""

    label: int
    a_seed: int
    threshold: int
    peers: dict[int, Peer]
    shared: list[int]
    masked: dict[int, str]  # client id -> object key of its masked input
    reveals: dict[int, Reveal]


def aggregate_secure(
    plan: RoundPlan, *, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> RoundAggregate:
    """Unmask every ready group's sum and build the adapters a secure round publishes."""
    config = plan.config
    with sessions() as session:
        groups = list(
            session.scalars(
                select(SecAggGroup)
                .where(SecAggGroup.round_id == plan.round_id)
                .order_by(SecAggGroup.label)
            )
        )
        ready = [_load(session, g) for g in groups if g.phase == SecAggPhase.READY]
        failed = {g.label: g.error for g in groups if g.phase != SecAggPhase.READY}
    clusters: list[dict[str, Any]] = [
        {"label": label, "published": False, "reason": reason, "secure": True}
        for label, reason in failed.items()
    ]
    outputs: list[ToPublish] = []
    weights: list[WeightedUpdate] = []
    for group in ready:
        started = time.perf_counter()
        try:
            adapter, weight_sum = _unmask(group, plan=plan, store=store, spec=spec)
        except ProtocolError as error:
            clusters.append({"label": group.label, "published": False, "reason": str(error)})
            continue
        problem = _sum_problem(adapter, weight_sum, count=len(group.masked), config=config)
        note = {
            "label": group.label,
            "secure": True,
            "advertised": len(group.peers),
            "shared": len(group.shared),
            "used": len(group.masked),
            "revealed": len(group.reveals),
            "weight_sum": weight_sum,
            "unmask_s": round(time.perf_counter() - started, 3),
            "published": problem is None,
            "reason": None if problem is None else f"the cluster's sum is unusable: {problem}",
        }
        clusters.append(note)
        if problem is not None:
            continue
        cluster_metrics: dict[str, Any] = {
            "method": "secure",
            "scope": config.scope,
            "clustering_id": plan.clustering_id,
            "cluster_label": group.label,
            "updates": len(group.masked),
            "weight_sum": weight_sum,
            "a_seed": group.a_seed,
            "rank": config.rank,
            "energy_kept": None,
        }
        name = cluster_adapter_name(group.label)
        outputs.append(ToPublish(name, AdapterKind.CLUSTER, group.label, adapter, cluster_metrics))
        weights.append(WeightedUpdate(adapter, weight_sum))
    if weights:
        result = global_adapter(weights, rank=config.rank, options=sketch_options(config))
        metrics: dict[str, Any] = {
            "method": "secure",
            "scope": config.scope,
            "clustering_id": plan.clustering_id,
            "energy_kept": result.energy_kept,
            "clusters": sorted(o.cluster_label for o in outputs if o.cluster_label is not None),
        }
        outputs.append(ToPublish(GLOBAL_ADAPTER, AdapterKind.GLOBAL, None, result.adapter, metrics))
    clusters.sort(key=lambda note: note["label"])
    return RoundAggregate(outputs=outputs, used=[], excluded=[], clusters=clusters)


def _sum_problem(
    adapter: LoraAdapter, weight_sum: float, *, count: int, config: RoundConfig
) -> str | None:
    """What the server can still check on a sum: honest inputs (weights in [0, 1], each
    product norm-clipped) give a weight sum in (0, count] and a mean within clip_norm."""
    if not 0 < weight_sum <= count * (1 + 1e-6):
        return f"its weights sum to {weight_sum:.6g}, outside (0, {count}]: an input is forged"
    bound = config.secure.clip_norm
    if bound is not None and (norm := update_norm(adapter)) > bound * (1 + 1e-3):
        return f"its mean has norm {norm:.6g} over clip_norm {bound:g}: an input was not clipped"
    return publish_problem(adapter)


def _load(session: Session, group: SecAggGroup) -> _Ready:
    assert group.threshold is not None  # fixed when the keys phase ended
    members = list(
        session.scalars(
            select(SecAggMember)
            .where(SecAggMember.group_id == group.id)
            .order_by(SecAggMember.client_id)
        )
    )
    return _Ready(
        label=group.label,
        a_seed=group.a_seed,
        threshold=group.threshold,
        peers={
            m.client_id: Peer(m.client_id, m.share_index, m.c_public, m.s_public)
            for m in members
            if m.share_index is not None
        },
        shared=[m.client_id for m in members if m.shared_at is not None],
        masked={m.client_id: m.masked_key for m in members if m.masked_key is not None},
        reveals={
            m.client_id: Reveal(
                b_shares={int(k): base64.b64decode(v) for k, v in m.revealed["b"].items()},
                s_shares={int(k): base64.b64decode(v) for k, v in m.revealed["s"].items()},
            )
            for m in members
            if m.revealed is not None
        },
    )


def _unmask(
    group: _Ready, *, plan: RoundPlan, store: ObjectStore, spec: LoraSpec
) -> tuple[LoraAdapter, float]:
    """The group's adapter and the sum of its weights."""
    config: RoundConfig = plan.config
    length = vector_length(spec, rank=config.rank)
    total = np.zeros(length, dtype=np.uint32)
    for client_id, key in sorted(group.masked.items()):
        data = store.get_bytes(key)
        if len(data) != 4 * length:
            raise ProtocolError(f"the masked input of device {client_id} has the wrong length")
        total += np.frombuffer(data, dtype="<u4")
    summed = unmask_sum(
        total,
        peers=group.peers,
        shared=group.shared,
        masked=list(group.masked),
        reveals=group.reveals,
        threshold=group.threshold,
        context=group_context(plan.round_id, group.label),
    )
    values = FixedPoint(config.secure.value_range, count=len(group.peers)).decode(summed)
    weight_sum = float(values[-1])
    mean_b = values[:-1] / weight_sum if weight_sum > 0 else values[:-1]
    a = frozen_a(spec, rank=config.rank, seed=group.a_seed)
    b = unflatten_b(mean_b, spec, rank=config.rank)
    return frozen_adapter(spec, a, b, rank=config.rank, alpha=config.secure_alpha), weight_sum


def forget_masked_inputs(
    plan: RoundPlan, *, sessions: sessionmaker[Session], store: ObjectStore
) -> int:
    """Delete the round's masked inputs once it is published; how many were deleted."""
    with sessions() as session:
        keys = list(
            session.scalars(
                select(SecAggMember.masked_key)
                .join(SecAggGroup, SecAggGroup.id == SecAggMember.group_id)
                .where(SecAggGroup.round_id == plan.round_id, SecAggMember.masked_key.is_not(None))
            )
        )
    for key in keys:
        if key is not None:
            store.delete(key)
    return len(keys)
