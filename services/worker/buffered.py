"""A buffered round's flushes: each cluster's adapter gets a new version every buffer_k updates.

While a buffered round collects, the aggregation task (queued by an upload, or by the round
loop, when a cluster holds buffer_k unaggregated updates) takes that cluster's oldest buffer_k
received updates, aggregates them as a sync round aggregates a cluster (`aggregate_plan`: the
same checks, clip bound, capped weights and staleness discount, an update's staleness being
the versions of its adapter published since the one it trained from) and publishes the
cluster's next version (`publish_round`) in one commit with those updates marked aggregated.
So an update is in exactly one version: a flush killed before its commit leaves its updates
received, and the next task redoes it; two tasks flushing the same buffer queue on the round's
row, and the second finds the updates taken and publishes nothing. The commit of the
buffer_versions-th version also publishes the round. A round closed early (its deadline, an
operator) flushes the full buffers left, excludes the rest and is published, or failed when it
published no version.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, cast

from redis import Redis
from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.worker.aggregation import Exclusion, RoundAggregate, RoundPlan, aggregate_plan
from services.worker.publishing import PublishedVersion, announce, publish_round
from services.worker.rounds import (
    MAX_ERROR_CHARS,
    aggregate_round_now,
    claim_round,
    load_plan,
    record_exclusions,
    round_summary,
)
from tessera.federation import RoundConfig
from tessera.lora import LoraSpec
from tessera.lora.bounds import ScaleRange
from tessera.models import (
    AdapterKind,
    AdapterVersion,
    Round,
    RoundState,
    Update,
    UpdateStatus,
    utcnow,
)
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)

LEFT_IN_BUFFER = "the buffered round ended before its cluster's buffer was full"
OPEN = (RoundState.COLLECTING, RoundState.AGGREGATING)


def aggregate_or_flush(
    round_id: int,
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis: Redis,
    scales: ScaleRange,
    stale_s: float,
    spec: LoraSpec | None = None,
) -> dict[str, Any]:
    """The aggregation task's work: a sync round's aggregation, or a buffered round's flushes."""
    with sessions() as session:
        round_row = session.get(Round, round_id)
        buffered = round_row is not None and RoundConfig.model_validate(round_row.config).buffered
    if not buffered:
        return aggregate_round_now(
            round_id,
            sessions=sessions,
            store=store,
            redis=redis,
            scales=scales,
            stale_s=stale_s,
            spec=spec,
        )
    return flush_round(round_id, sessions=sessions, store=store, redis=redis, scales=scales)


def flush_round(
    round_id: int,
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis: Redis,
    scales: ScaleRange,
) -> dict[str, Any]:
    """Publish a version of every cluster whose buffer is full, until none is; end the round
    when it has its versions, or when it was closed (aggregating). Safe to run again."""
    versions: list[PublishedVersion] = []
    excluded: list[Exclusion] = []
    events = 0
    with sessions() as session:
        round_row = session.get_one(Round, round_id)
        if round_row.state == RoundState.AGGREGATING:
            claim_round(session, round_id)  # the round loop requeues it if this run dies
    while True:
        with sessions() as session:
            state = session.get_one(Round, round_id).state
            plan = load_plan(session, round_id, statuses=[UpdateStatus.RECEIVED])
        if state not in OPEN:
            break
        buffer = _full_buffer(plan)
        if buffer is None:
            if state == RoundState.AGGREGATING:
                _end_closed_round(sessions, round_id, plan)
            break
        result = aggregate_plan(buffer, store=store, scales=scales)
        # In scope cluster, the global adapter of one cluster's buffer is not published.
        scope = plan.config.scope
        outputs = [o for o in result.outputs if o.kind != AdapterKind.GLOBAL or scope == "global"]
        finish = _taking(round_id, plan.config, buffer, result, publishes=bool(outputs))
        if not outputs:
            with sessions() as session:
                if finish(session):
                    session.commit()
                    excluded += result.excluded
                else:
                    session.rollback()
            continue
        published = publish_round(
            outputs,
            round_id=round_id,
            method=plan.config.method,
            sessions=sessions,
            store=store,
            finish=finish,
            flush=True,
        )
        if isinstance(published, RoundState):
            continue  # another run took this buffer (or the round moved): look again
        versions += published
        excluded += result.excluded
        events += announce(redis, published, round_id=round_id)
        log.info(
            "buffer flushed",
            extra={"round_id": round_id, "versions": [v.version for v in published]},
        )
    with sessions() as session:
        final = session.get_one(Round, round_id).state
    return round_summary(
        round_id,
        status="flushed" if final in OPEN else final.value,
        config=plan.config,
        adapters=versions,
        excluded=excluded,
        events=events,
    )


def _full_buffer(plan: RoundPlan) -> RoundPlan | None:
    """The plan of one cluster's oldest buffer_k received updates (the lowest label first;
    with the updates that cannot be grouped, excluded with it), or None if no buffer is full."""
    size = plan.config.buffer_k
    assert size is not None  # RoundConfig requires it in mode buffered
    full = sorted(
        (label for label, refs in plan.groups.items() if len(refs) >= size),
        key=lambda label: -1 if label is None else label,
    )
    if not full:
        return None
    label = full[0]
    return dataclasses.replace(plan, groups={label: plan.groups[label][:size]})


def _taking(
    round_id: int,
    config: RoundConfig,
    buffer: RoundPlan,
    result: RoundAggregate,
    *,
    publishes: bool,
) -> Callable[[Session], bool]:
    """What a flush's transaction does first: take the round's row, check that every update of
    the buffer is still received (False, doing nothing, if another run took them or the round
    ended), mark them aggregated or excluded, and publish the round with its last version."""
    taken = [ref.id for refs in buffer.groups.values() for ref in refs]
    taken += [exclusion.update_id for exclusion in buffer.unassigned]

    def finish(session: Session) -> bool:
        held = session.execute(
            update(Round)
            .where(Round.id == round_id, Round.state.in_(OPEN))
            .values(heartbeat_at=utcnow())
        )
        if cast(CursorResult[Any], held).rowcount != 1:
            return False
        waiting = session.scalar(
            select(func.count()).where(Update.id.in_(taken), Update.status == UpdateStatus.RECEIVED)
        )
        if waiting != len(taken):
            return False
        if result.used:
            session.execute(
                update(Update)
                .where(Update.id.in_(result.used))
                .values(status=UpdateStatus.AGGREGATED, exclusion_reason=None)
            )
        record_exclusions(session, result.excluded)
        report = {"clusters": result.clusters, "withheld": result.withheld}
        published = session.scalar(select(func.count()).where(AdapterVersion.round_id == round_id))
        versions = (published or 0) + publishes
        assert config.buffer_versions is not None  # RoundConfig requires it in mode buffered
        if publishes and versions >= config.buffer_versions:
            _end(session, round_id, report={**report, "versions": versions})
        else:
            session.execute(
                update(Round)
                .where(Round.id == round_id)
                .values(report={**report, "versions": versions})
            )
        return True

    return finish


def _end_closed_round(sessions: sessionmaker[Session], round_id: int, plan: RoundPlan) -> None:
    """A closed buffered round with no full buffer left: published if it published a version,
    else failed; its received updates are excluded."""
    with sessions() as session:
        published = session.scalar(select(func.count()).where(AdapterVersion.round_id == round_id))
        report = {"clusters": [], "withheld": [], "versions": published or 0}
        failed = None if published else "no cluster filled a buffer of buffer_k updates"
        if _end(session, round_id, report=report, failed=failed, closing=True):
            record_exclusions(session, plan.unassigned)
            session.commit()
        else:
            session.rollback()


def _end(
    session: Session,
    round_id: int,
    *,
    report: dict[str, Any],
    failed: str | None = None,
    closing: bool = False,
) -> bool:
    """Move the round (collecting, or aggregating when `closing`) to published or failed and
    exclude the updates left in its buffers; whether it moved."""
    values: dict[str, Any] = (
        {"state": RoundState.FAILED, "error": failed[:MAX_ERROR_CHARS]}
        if failed
        else {"state": RoundState.PUBLISHED, "published_at": utcnow(), "error": None}
    )
    if not closing:
        values["closed_at"] = utcnow()
    moved = session.execute(
        update(Round)
        .where(Round.id == round_id, Round.state.in_(OPEN))
        .values(report=report, **values)
    )
    if cast(CursorResult[Any], moved).rowcount != 1:
        return False
    session.execute(
        update(Update)
        .where(Update.round_id == round_id, Update.status == UpdateStatus.RECEIVED)
        .values(status=UpdateStatus.EXCLUDED, exclusion_reason=LEFT_IN_BUFFER)
    )
    return True
