"""Closing rounds: progress towards quorum, the deadline, and handing the round to the worker.

The one implementation of both rules; the round loop (`rounds_loop`) applies them every
TESSERA_HOUSEKEEPING_INTERVAL_S, and requests apply them early (an upload that reaches quorum,
a read past the deadline). A round leaves `collecting` through one conditional UPDATE
(`crud.move_round`), so however many requests or replicas race to close it, one of them wins
and only that one enqueues the aggregation. If the enqueueing fails, the round goes back to
`collecting` and the loop's next pass tries again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from services.aggregator import crud
from tessera.events import AGGREGATION_QUEUE, TASK_AGGREGATE_ROUND
from tessera.federation import NO_UPDATES_AT_DEADLINE, RoundConfig
from tessera.models import Round, RoundState, utcnow
from tessera.schemas import ClusterProgress, as_utc

log = logging.getLogger(__name__)


class EnqueueError(RuntimeError):
    """The aggregation task could not be sent; the round is collecting again."""


@dataclass(frozen=True)
class RoundProgress:
    """How many updates a round has, in total and per cluster of its clustering."""

    total: int
    clusters: list[ClusterProgress]

    @property
    def unassigned(self) -> int:
        return self.total - sum(cluster.updates for cluster in self.clusters)

    def quorum_met(self, config: RoundConfig) -> bool:
        """`min_updates` in all, and `min_updates_per_cluster` in every cluster with members."""
        if self.total < config.min_updates:
            return False
        return all(
            cluster.updates >= config.min_updates_per_cluster
            for cluster in self.clusters
            if cluster.members > 0
        )


def is_due(round_: Round, now: datetime) -> bool:
    return (
        round_.state == RoundState.COLLECTING
        and round_.deadline is not None
        and as_utc(round_.deadline) <= now
    )


def round_progress(*, session: Session, round_: Round) -> RoundProgress:
    total = crud.count_updates(session=session, round_id=round_.id)
    if round_.clustering_id is None:
        return RoundProgress(total=total, clusters=[])
    members = crud.cluster_members(session=session, clustering_id=round_.clustering_id)
    updates = crud.updates_per_cluster(
        session=session, round_id=round_.id, clustering_id=round_.clustering_id
    )
    clusters = [
        ClusterProgress(label=label, members=members.get(label, 0), updates=updates.get(label, 0))
        for label in sorted(members.keys() | updates.keys())
    ]
    return RoundProgress(total=total, clusters=clusters)


def send_aggregation(celery: Celery, round_id: int) -> None:
    """Queue the aggregation of a round (no result: the worker records it on the round)."""
    # Waiting on the result backend would hold a request for many seconds while Redis is down.
    celery.send_task(
        TASK_AGGREGATE_ROUND, args=[round_id], queue=AGGREGATION_QUEUE, ignore_result=True
    )


def close_round(*, session: Session, celery: Celery, round_id: int, why: str) -> bool:
    """Move a collecting round to aggregating and enqueue its aggregation; whether this call did.

    Commits (with whatever the caller's transaction holds). Raises EnqueueError (with the round
    collecting again) if the task cannot be sent.
    """
    if not crud.move_round(
        session=session,
        round_id=round_id,
        from_state=RoundState.COLLECTING,
        to_state=RoundState.AGGREGATING,
        closed_at=utcnow(),
    ):
        session.rollback()
        return False
    session.commit()
    try:
        send_aggregation(celery, round_id)
    except Exception as error:
        crud.move_round(
            session=session,
            round_id=round_id,
            from_state=RoundState.AGGREGATING,
            to_state=RoundState.COLLECTING,
        )
        session.commit()
        log.exception("could not enqueue the aggregation of round %s", round_id)
        raise EnqueueError(f"could not enqueue the aggregation of round {round_id}") from error
    log.info("round closed", extra={"round_id": round_id, "why": why})
    return True


def close_at_deadline(*, session: Session, celery: Celery, round_id: int) -> bool:
    """Close a round whose deadline passed: aggregate what it has, or cancel it if it has none.

    Atomic with uploads: the round's row lock is taken first (an upload holds it until its
    commit), then the updates are counted, then the round moves, in one transaction; so an
    upload committed meanwhile is counted, never accepted and then dropped with the round.
    """
    if not crud.hold_collecting_round(session=session, round_id=round_id):
        session.rollback()
        return False
    round_ = session.get_one(Round, round_id)
    if round_.config.get("method") == "secure":
        from services.aggregator import secagg  # it closes rounds through this module

        return secagg.close_at_deadline(session=session, celery=celery, round_id=round_id)
    if crud.count_updates(session=session, round_id=round_id) > 0:
        return close_round(session=session, celery=celery, round_id=round_id, why="deadline")
    cancelled = crud.move_round(
        session=session,
        round_id=round_id,
        from_state=RoundState.COLLECTING,
        to_state=RoundState.CANCELLED,
        closed_at=utcnow(),
        error=NO_UPDATES_AT_DEADLINE,
    )
    session.commit()
    if cancelled:
        log.info("round cancelled at its deadline: no updates", extra={"round_id": round_id})
    return cancelled


def close_at_quorum(*, session: Session, celery: Celery, round_: Round) -> bool:
    """Close a collecting round that has reached its quorum; whether this call did. A buffered
    round stays collecting: its flush is queued when a cluster's buffer is full."""
    if round_.state != RoundState.COLLECTING:
        return False
    config = RoundConfig.model_validate(round_.config)
    if config.buffered:
        _flush_when_full(session=session, celery=celery, round_=round_, config=config)
        return False
    if not round_progress(session=session, round_=round_).quorum_met(config):
        return False
    return close_round(session=session, celery=celery, round_id=round_.id, why="quorum")


def _flush_when_full(
    *, session: Session, celery: Celery, round_: Round, config: RoundConfig
) -> bool:
    """Queue a buffered round's flush if a cluster (or, in scope global, the round) holds
    buffer_k unaggregated updates; whether it did. The worker flushes each buffer once,
    however many flushes are queued, and the round loop's next pass queues a lost one again."""
    assert config.buffer_k is not None  # RoundConfig requires it in mode buffered
    if config.scope == "cluster" and round_.clustering_id is not None:
        per_cluster = crud.updates_per_cluster(
            session=session, round_id=round_.id, clustering_id=round_.clustering_id, waiting=True
        )
        waiting = max(per_cluster.values(), default=0)
    else:
        waiting = crud.count_updates(session=session, round_id=round_.id, waiting=True)
    session.rollback()
    if waiting < config.buffer_k:
        return False
    try:
        send_aggregation(celery, round_.id)
    except Exception as error:
        log.exception("could not enqueue the flush of round %s", round_.id)
        raise EnqueueError(f"could not enqueue the flush of round {round_.id}") from error
    return True


def close_if_due(*, session: Session, celery: Celery, round_: Round) -> bool:
    """The lazy deadline check of a request; refreshes `round_` when it closed it."""
    if not is_due(round_, utcnow()):
        return False
    try:
        closed = close_at_deadline(session=session, celery=celery, round_id=round_.id)
    except EnqueueError:
        return False
    session.refresh(round_)
    return closed


def close_due_rounds(*, sessions: sessionmaker[Session], celery: Celery) -> list[int]:
    """Close every collecting round past its deadline or at quorum; the ids this call closed.

    A round whose aggregation could not be enqueued stays collecting, and the next pass
    tries again (the quorum close of an upload no longer has to succeed for the round to end).
    """
    closed = []
    with sessions() as session:
        for round_id in crud.collecting_round_ids(session=session):
            round_ = session.get(Round, round_id)
            if round_ is None:
                continue
            try:
                if is_due(round_, utcnow()):
                    done = close_at_deadline(session=session, celery=celery, round_id=round_id)
                else:
                    done = close_at_quorum(session=session, celery=celery, round_=round_)
            except EnqueueError:
                continue  # logged; the next pass tries again
            session.rollback()
            if done:
                closed.append(round_id)
    return closed
