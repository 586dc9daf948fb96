"""A round's life in the worker: claim it, aggregate and publish it, or fail it.

Aggregating is idempotent. Every adapter is recomputed from the round's stored updates, and each
version is written once, guarded by the unique (adapter_id, round_id) constraint, so a rerun
after a crash or a redelivered message reuses what exists and writes only what is missing.
Update and round states change in one final commit with the versions; the "adapter published"
events follow it. While it runs, the task beats a heartbeat on the round, so that the
aggregator's round loop (`services.aggregator.rounds_loop`) can tell a dead worker's round and
queue it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import redis.exceptions
import sqlalchemy.exc
import torch
import urllib3.exceptions
from redis import Redis
from sqlalchemy import CursorResult, Integer, case, func, select, type_coerce, update
from sqlalchemy.orm import Session, sessionmaker

from services.worker.aggregation import (
    Exclusion,
    RoundPlan,
    UpdateRef,
    aggregate_plan,
)
from services.worker.publishing import PublishedVersion, announce, publish_round
from services.worker.secure import aggregate_secure, forget_masked_inputs
from tessera.federation import RoundConfig, task_vector_from_bytes
from tessera.heartbeat import Heartbeat
from tessera.lora import LoraSpec
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
DEFAULT_STALE_S = 60.0  # TESSERA_TASK_STALE_S's default; the task passes the setting


def aggregate_round_now(
    round_id: int,
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis: Redis,
    scales: ScaleRange,
    stale_s: float = DEFAULT_STALE_S,
    noise_seed: int | None = None,
    spec: LoraSpec | None = None,
) -> dict[str, Any]:
    """Aggregate an `aggregating` round and publish its adapters; return what was done.

    A published round returns what it published; any other state is skipped. An unusable update
    is excluded with its reason (`scales`: the LoRA scales accepted); an error that is not a
    connection's marks the round failed and propagates. `noise_seed` fixes a private round's
    noise (tests only; by default it is seeded from the OS's randomness). A secure round needs
    the base model's LoRA `spec` (the layout of its devices' inputs).
    """
    with sessions() as session:
        round_row = session.get(Round, round_id)
        if round_row is None:
            return round_summary(
                round_id, status="skipped", reason=f"round {round_id} does not exist"
            )
        if round_row.state == RoundState.PUBLISHED:
            return _already_published(session, round_row)
        if round_row.state != RoundState.AGGREGATING:
            reason = f"round is {round_row.state.value}, not aggregating"
            return round_summary(round_id, status="skipped", reason=reason)
        claim_round(session, round_id)
    try:
        beat = Heartbeat.for_stale_after(
            lambda: beat_round(sessions, round_id), stale_s=stale_s, name=f"round-{round_id}"
        )
        with beat:
            with sessions() as session:
                plan = load_plan(session, round_id)
            return _aggregate_and_publish(
                plan,
                sessions=sessions,
                store=store,
                redis=redis,
                scales=scales,
                noise_seed=noise_seed,
                spec=spec,
            )
    except TRANSIENT_ERRORS:
        raise
    except Exception as error:
        try:
            mark_round_failed(sessions, round_id, f"{type(error).__name__}: {error}")
        except Exception:
            log.exception("could not mark the round failed", extra={"round_id": round_id})
        raise


def claim_round(session: Session, round_id: int) -> bool:
    """Count a run of an aggregating round and beat its heartbeat; False if not aggregating."""
    claimed = session.execute(
        update(Round)
        .where(Round.id == round_id, Round.state == RoundState.AGGREGATING)
        .values(attempts=Round.attempts + 1, heartbeat_at=utcnow())
    )
    session.commit()
    return cast(CursorResult[Any], claimed).rowcount == 1


def beat_round(sessions: sessionmaker[Session], round_id: int) -> None:
    """Say that the worker aggregating the round is alive."""
    with sessions() as session:
        session.execute(
            update(Round)
            .where(Round.id == round_id, Round.state == RoundState.AGGREGATING)
            .values(heartbeat_at=utcnow())
        )
        session.commit()


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


COUNTED = (UpdateStatus.RECEIVED, UpdateStatus.AGGREGATED)


def load_plan(
    session: Session, round_id: int, *, statuses: Sequence[UpdateStatus] = COUNTED
) -> RoundPlan:
    """The round's updates in `statuses`, oldest first, grouped by their device's cluster; a
    disabled device's update, and one without a cluster, set aside as unassigned."""
    round_row = session.get_one(Round, round_id)
    config = RoundConfig.model_validate(round_row.config)
    rows = session.execute(
        select(Update, Client.disabled_at)
        .join(Client, Client.id == Update.client_id)
        .where(Update.round_id == round_id, Update.status.in_(statuses))
        .order_by(Update.id)
    ).all()
    refs: list[UpdateRef] = []
    unassigned: list[Exclusion] = []
    behind = _versions_behind(session, {row.base_version_id for row, _ in rows})
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
                staleness=behind.get(row.base_version_id, 0),
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


def _versions_behind(session: Session, version_ids: set[int | None]) -> dict[int | None, int]:
    """For each adapter version an update trained from, how many versions of the same adapter
    were published after it (its staleness; a missing one counts as fresh)."""
    ids = [version_id for version_id in version_ids if version_id is not None]
    if not ids:
        return {}
    newest = (
        select(AdapterVersion.adapter_id, func.max(AdapterVersion.version).label("newest"))
        .group_by(AdapterVersion.adapter_id)
        .subquery()
    )
    rows = session.execute(
        select(AdapterVersion.id, type_coerce(newest.c.newest - AdapterVersion.version, Integer))
        .join(newest, newest.c.adapter_id == AdapterVersion.adapter_id)
        .where(AdapterVersion.id.in_(ids))
    )
    return {version_id: behind for version_id, behind in rows}


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
    noise_seed: int | None,
    spec: LoraSpec | None,
) -> dict[str, Any]:
    config = plan.config
    if config.method == "secure":
        if spec is None:
            raise ValueError("a secure round needs the base model's LoRA spec")
        result = aggregate_secure(plan, sessions=sessions, store=store, spec=spec)
    else:
        result = aggregate_plan(plan, store=store, scales=scales, noise_seed=noise_seed)
    report = {"clusters": result.clusters, "withheld": result.withheld}
    if not result.outputs:
        reason = "nothing to publish: no group had enough usable updates"
        _finish(
            sessions, plan.round_id, used=[], excluded=result.excluded, report=report, failed=reason
        )
        return round_summary(
            plan.round_id,
            status="failed",
            reason=reason,
            config=config,
            clusters=result.clusters,
            excluded=result.excluded,
        )
    published = publish_round(
        result.outputs,
        round_id=plan.round_id,
        method=config.method,
        sessions=sessions,
        store=store,
        finish=_finishing(
            plan.round_id, used=result.used, excluded=result.excluded, report=report, failed=None
        ),
    )
    if isinstance(published, RoundState):
        # Another run (a duplicate message, a requeued round) published it, or an operator
        # failed it: only the run whose commit published the round announces it.
        reason = f"the round became {published.value} while it was aggregated; nothing announced"
        return round_summary(
            plan.round_id,
            status="interrupted",
            reason=reason,
            config=config,
            clusters=result.clusters,
            excluded=result.excluded,
        )
    versions = published
    if config.method == "secure":
        forget_masked_inputs(plan, sessions=sessions, store=store)
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
    return round_summary(
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
    failed: str,
) -> None:
    """One commit: the round failed (if still aggregating), its report and its updates'
    statuses and exclusion reasons."""
    with sessions() as session:
        finish = _finishing(round_id, used=used, excluded=excluded, report=report, failed=failed)
        if finish(session):
            session.commit()
        else:
            session.rollback()


def _finishing(
    round_id: int,
    *,
    used: list[int],
    excluded: list[Exclusion],
    report: dict[str, Any],
    failed: str | None,
) -> Callable[[Session], bool]:
    """What the final transaction does: move the round from aggregating to published (or
    failed) with its report, and record its updates' statuses; False, doing nothing, if the
    round is no longer aggregating. Its UPDATE takes the round's row first, so duplicate runs
    queue behind it and then find the round moved."""

    def finish(session: Session) -> bool:
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
            return False
        if used:
            session.execute(
                update(Update)
                .where(Update.id.in_(used))
                .values(status=UpdateStatus.AGGREGATED, exclusion_reason=None)
            )
        record_exclusions(session, excluded)
        return True

    return finish


def record_exclusions(session: Session, excluded: Sequence[Exclusion]) -> None:
    """Mark each excluded update so, with its reason (uncommitted)."""
    for exclusion in excluded:
        session.execute(
            update(Update)
            .where(Update.id == exclusion.update_id)
            .values(
                status=UpdateStatus.EXCLUDED, exclusion_reason=exclusion.reason[:MAX_REASON_CHARS]
            )
        )


def _already_published(session: Session, round_row: Round) -> dict[str, Any]:
    rows = session.execute(
        select(AdapterVersion, Adapter.name)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(AdapterVersion.round_id == round_row.id)
        .order_by(AdapterVersion.id)
    )
    versions = [PublishedVersion.of(row.AdapterVersion, row.name, reused=True) for row in rows]
    config = RoundConfig.model_validate(round_row.config)
    return round_summary(
        round_row.id,
        status="already_published",
        reason="the round was already published",
        config=config,
        adapters=versions,
    )


def round_summary(
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


def _as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored one is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
