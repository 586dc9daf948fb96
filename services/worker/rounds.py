"""A round's life in the worker: aggregate and publish it, fail it, close it at its deadline.

Aggregating is idempotent. Every adapter is recomputed from the round's stored updates, and each
version is written once, guarded by the unique (adapter_id, round_id) constraint, so a rerun
after a crash or a redelivered message reuses what exists and writes only what is missing.
Update and round states change in one final commit; the "adapter published" events follow it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis.exceptions
import sqlalchemy.exc
import torch
import urllib3.exceptions
from redis import Redis
from sqlalchemy import ColumnElement, CursorResult, case, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.worker.aggregation import (
    Exclusion,
    RoundPlan,
    UpdateRef,
    aggregate_plan,
)
from services.worker.publishing import PublishedVersion, announce, publish_version
from tessera.federation import NO_UPDATES_AT_DEADLINE, RoundConfig, task_vector_from_bytes
from tessera.lora.bounds import ScaleRange
from tessera.metrics import ROUND_DURATION
from tessera.models import (
    Adapter,
    AdapterVersion,
    Assignment,
    Client,
    Cluster,
    Clustering,
    Round,
    RoundState,
    Update,
    UpdateStatus,
    utcnow,
)
from tessera.storage import ObjectStore, StorageUnavailableError

log = logging.getLogger(__name__)

# Errors of a connection, not of the round: the task retries them instead of failing the round.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError,
    urllib3.exceptions.HTTPError,
    StorageUnavailableError,  # the object store refused a connection or answered 5xx
)
MAX_ERROR_CHARS = 500
MAX_REASON_CHARS = 500


def aggregate_round_now(
    round_id: int,
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis: Redis,
    scales: ScaleRange,
) -> dict[str, Any]:
    """Aggregate an `aggregating` round and publish its adapters; return what was done.

    A published round returns what it published; any other state is skipped. An unusable update
    is excluded with its reason (`scales`: the LoRA scales accepted); an error that is not a
    connection's marks the round failed and propagates.
    """
    with sessions() as session:
        round_row = session.get(Round, round_id)
        if round_row is None:
            return _summary(round_id, status="skipped", reason=f"round {round_id} does not exist")
        if round_row.state == RoundState.PUBLISHED:
            return _already_published(session, round_row)
        if round_row.state != RoundState.AGGREGATING:
            reason = f"round is {round_row.state.value}, not aggregating"
            return _summary(round_id, status="skipped", reason=reason)
    try:
        with sessions() as session:
            plan = _load_plan(session, round_id)
        return _aggregate_and_publish(
            plan, sessions=sessions, store=store, redis=redis, scales=scales
        )
    except TRANSIENT_ERRORS:
        raise
    except Exception as error:
        try:
            mark_round_failed(sessions, round_id, f"{type(error).__name__}: {error}")
        except Exception:
            log.exception("could not mark the round failed", extra={"round_id": round_id})
        raise


def mark_round_failed(sessions: sessionmaker[Session], round_id: int, error: str) -> bool:
    """Move an aggregating round to failed with a short message; False if it was not aggregating."""
    with sessions() as session:
        result = session.execute(
            update(Round)
            .where(Round.id == round_id, Round.state == RoundState.AGGREGATING)
            .values(state=RoundState.FAILED, error=error[:MAX_ERROR_CHARS])
        )
        session.commit()
    failed = cast(CursorResult[Any], result).rowcount == 1
    if failed:
        log.error("round failed", extra={"round_id": round_id, "error": error[:MAX_ERROR_CHARS]})
    return failed


def _load_plan(session: Session, round_id: int) -> RoundPlan:
    round_row = session.get_one(Round, round_id)
    config = RoundConfig.model_validate(round_row.config)
    rows = session.execute(
        select(Update, Client.disabled_at)
        .join(Client, Client.id == Update.client_id)
        .where(
            Update.round_id == round_id,
            Update.status.in_([UpdateStatus.RECEIVED, UpdateStatus.AGGREGATED]),
        )
        .order_by(Update.id)
    ).all()
    refs: list[UpdateRef] = []
    unassigned: list[Exclusion] = []
    for row, disabled_at in rows:
        if disabled_at is not None:
            reason = f"client {row.client_id} is disabled"
            unassigned.append(Exclusion(row.id, row.client_id, reason))
            continue
        refs.append(
            UpdateRef(
                id=row.id,
                client_id=row.client_id,
                object_key=row.object_key,
                sha256=row.sha256,
                num_samples=row.num_samples,
                train_loss=row.train_loss,
            )
        )
    groups: dict[int | None, list[UpdateRef]] = {}
    centroids: dict[int, torch.Tensor] = {}
    if config.scope == "global":
        groups[None] = refs
    else:
        labels = _labels(session, round_row.clustering_id, sorted({r.client_id for r in refs}))
        for ref in refs:
            label = labels.get(ref.client_id)
            if label is None:
                reason = f"client {ref.client_id} has no cluster assignment"
                unassigned.append(Exclusion(ref.id, ref.client_id, reason))
            else:
                groups.setdefault(label, []).append(ref)
        centroids = _centroids(
            session, round_row.clustering_id, sorted(label for label in groups if label is not None)
        )
    return RoundPlan(
        round_id=round_id,
        config=config,
        opened_at=_as_utc(round_row.opened_at),
        clustering_id=round_row.clustering_id,
        groups=groups,
        centroids=centroids,
        unassigned=unassigned,
    )


def _labels(session: Session, clustering_id: int | None, client_ids: list[int]) -> dict[int, int]:
    """Each client's label in the round's clustering, else in its most recent assignment."""
    rows = session.execute(
        select(Assignment.client_id, Assignment.label)
        .where(Assignment.client_id.in_(client_ids))
        .order_by(
            case((Assignment.clustering_id == clustering_id, 0), else_=1),
            Assignment.created_at.desc(),
            Assignment.id.desc(),
        )
    )
    labels: dict[int, int] = {}
    for row in rows:
        labels.setdefault(row.client_id, row.label)
    return labels


def _centroids(
    session: Session, clustering_id: int | None, labels: list[int]
) -> dict[int, torch.Tensor]:
    """Each label's centroid in the round's clustering, else in the newest one that has it."""
    rows = session.execute(
        select(Cluster.label, Cluster.centroid)
        .join(Clustering, Clustering.id == Cluster.clustering_id)
        .where(Cluster.label.in_(labels))
        .order_by(
            case((Cluster.clustering_id == clustering_id, 0), else_=1), Clustering.version.desc()
        )
    )
    blobs: dict[int, bytes] = {}
    for row in rows:
        blobs.setdefault(row.label, row.centroid)
    return {label: torch.from_numpy(task_vector_from_bytes(blob)) for label, blob in blobs.items()}


def _aggregate_and_publish(
    plan: RoundPlan,
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis: Redis,
    scales: ScaleRange,
) -> dict[str, Any]:
    config = plan.config
    result = aggregate_plan(plan, store=store, scales=scales)
    report = {"clusters": result.clusters, "withheld": result.withheld}
    if not result.outputs:
        reason = "nothing to publish: no group had enough usable updates"
        _finish(
            sessions, plan.round_id, used=[], excluded=result.excluded, report=report, failed=reason
        )
        return _summary(
            plan.round_id,
            status="failed",
            reason=reason,
            config=config,
            clusters=result.clusters,
            excluded=result.excluded,
        )
    versions = [
        publish_version(
            output, round_id=plan.round_id, method=config.method, sessions=sessions, store=store
        )
        for output in result.outputs
    ]
    state = _finish(
        sessions,
        plan.round_id,
        used=result.used,
        excluded=result.excluded,
        report=report,
        failed=None,
    )
    if state != RoundState.PUBLISHED:
        reason = f"the round became {state.value} while it was aggregated; nothing was announced"
        return _summary(
            plan.round_id,
            status="interrupted",
            reason=reason,
            adapters=versions,
            config=config,
            clusters=result.clusters,
            excluded=result.excluded,
        )
    ROUND_DURATION.observe((utcnow() - plan.opened_at).total_seconds())
    events = announce(redis, versions, round_id=plan.round_id)
    log.info(
        "round published",
        extra={
            "round_id": plan.round_id,
            "versions": len(versions),
            "excluded": len(result.excluded),
        },
    )
    return _summary(
        plan.round_id,
        status="published",
        adapters=versions,
        events=events,
        config=config,
        clusters=result.clusters,
        excluded=result.excluded,
    )


def _finish(
    sessions: sessionmaker[Session],
    round_id: int,
    *,
    used: list[int],
    excluded: list[Exclusion],
    report: dict[str, Any],
    failed: str | None,
) -> RoundState:
    """One commit: update statuses and exclusion reasons, the round's report, and the round
    published (or failed); return its state."""
    with sessions() as session:
        values: dict[str, Any] = (
            {"state": RoundState.FAILED, "error": failed[:MAX_ERROR_CHARS]}
            if failed
            else {"state": RoundState.PUBLISHED, "published_at": utcnow(), "error": None}
        )
        values["report"] = report
        moved = session.execute(
            update(Round)
            .where(Round.id == round_id, Round.state == RoundState.AGGREGATING)
            .values(**values)
        )
        if cast(CursorResult[Any], moved).rowcount != 1:
            session.rollback()
            return session.get_one(Round, round_id).state
        if used:
            session.execute(
                update(Update)
                .where(Update.id.in_(used))
                .values(status=UpdateStatus.AGGREGATED, exclusion_reason=None)
            )
        for exclusion in excluded:
            session.execute(
                update(Update)
                .where(Update.id == exclusion.update_id)
                .values(
                    status=UpdateStatus.EXCLUDED,
                    exclusion_reason=exclusion.reason[:MAX_REASON_CHARS],
                )
            )
        session.commit()
        return cast(RoundState, values["state"])


def _already_published(session: Session, round_row: Round) -> dict[str, Any]:
    rows = session.execute(
        select(AdapterVersion, Adapter.name)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(AdapterVersion.round_id == round_row.id)
        .order_by(AdapterVersion.id)
    )
    versions = [PublishedVersion.of(row.AdapterVersion, row.name, reused=True) for row in rows]
    config = RoundConfig.model_validate(round_row.config)
    return _summary(
        round_row.id,
        status="already_published",
        reason="the round was already published",
        config=config,
        adapters=versions,
    )


def _summary(
    round_id: int,
    *,
    status: str,
    reason: str | None = None,
    config: RoundConfig | None = None,
    adapters: Sequence[PublishedVersion] = (),
    clusters: Sequence[dict[str, Any]] = (),
    excluded: Sequence[Exclusion] = (),
    events: int = 0,
) -> dict[str, Any]:
    return {
        "round_id": round_id,
        "status": status,
        "reason": reason,
        "method": config.method if config else None,
        "scope": config.scope if config else None,
        "adapters": [version.as_dict() for version in adapters],
        "clusters": list(clusters),
        "excluded": [exclusion.as_dict() for exclusion in excluded],
        "events": events,
    }


def close_due_rounds_now(
    *,
    sessions: sessionmaker[Session],
    enqueue: Callable[[int], object],
    now: datetime | None = None,
) -> dict[str, list[int]]:
    """Close collecting rounds past their deadline: to aggregating (and enqueue) or cancelled.

    A round's deadline is its `deadline` column, else `opened_at + config.deadline_s`. Each move
    is one conditional UPDATE, so a round the aggregator closes at the same moment moves once.
    A round whose task cannot be sent goes back to collecting, for the next pass to retry.
    """
    now = now or utcnow()
    closed: list[int] = []
    cancelled: list[int] = []
    with sessions() as session:
        collecting: Sequence[Round] = session.scalars(
            select(Round).where(Round.state == RoundState.COLLECTING).order_by(Round.id)
        ).all()
        due = [r.id for r in collecting if (deadline := _deadline(r)) and deadline <= now]
        for round_id in due:
            has_updates = exists().where(Update.round_id == round_id)
            to_aggregating = {"state": RoundState.AGGREGATING, "closed_at": now}
            to_cancelled = {**to_aggregating, "state": RoundState.CANCELLED}
            if _move(session, round_id, RoundState.COLLECTING, has_updates, **to_aggregating):
                closed.append(round_id)
            elif _move(
                session,
                round_id,
                RoundState.COLLECTING,
                ~has_updates,
                error=NO_UPDATES_AT_DEADLINE,
                **to_cancelled,
            ):
                cancelled.append(round_id)
            session.commit()
    sent: list[int] = []
    reopened: list[int] = []
    for round_id in closed:
        try:
            enqueue(round_id)
        except Exception:
            log.exception("could not enqueue the aggregation", extra={"round_id": round_id})
            with sessions() as session:
                back = {"state": RoundState.COLLECTING, "closed_at": None}
                _move(session, round_id, RoundState.AGGREGATING, None, **back)
                session.commit()
            reopened.append(round_id)
        else:
            sent.append(round_id)
    if closed or cancelled:
        log.info("rounds closed at deadline", extra={"aggregating": sent, "cancelled": cancelled})
    return {"aggregating": sent, "cancelled": cancelled, "reopened": reopened}


def _move(
    session: Session,
    round_id: int,
    from_state: RoundState,
    condition: ColumnElement[bool] | None,
    **values: Any,
) -> bool:
    """One conditional UPDATE of a round in `from_state`; whether it moved."""
    query = update(Round).where(Round.id == round_id, Round.state == from_state)
    if condition is not None:
        query = query.where(condition)
    return cast(CursorResult[Any], session.execute(query.values(**values))).rowcount == 1


def _deadline(round_row: Round) -> datetime | None:
    if round_row.deadline is not None:
        return _as_utc(round_row.deadline)
    seconds = (round_row.config or {}).get("deadline_s")
    if seconds is None:
        return None
    return _as_utc(round_row.opened_at) + timedelta(seconds=float(seconds))


def _as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored one is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
