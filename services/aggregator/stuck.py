"""Rounds stuck in `aggregating`: queued again when their worker died, retried or failed by hand.

The aggregation task beats a heartbeat on its round (`services.worker.rounds.claim_round`). A
round whose heartbeat (or, before any run, its closing) is older than TESSERA_TASK_STALE_S has
no live worker: its message was lost, or the worker died holding it, which Redis would only
notice after its visibility timeout (TESSERA_TASK_TIME_LIMIT_S + 300 s). The round loop queues
it again, and fails it after MAX_AGGREGATION_RUNS runs whose worker died. Every move is one
conditional UPDATE, so replicas racing on a round move it once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, cast

from celery import Celery
from sqlalchemy import ColumnElement, CursorResult, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.aggregator.closing import EnqueueError, send_aggregation
from tessera.models import Round, RoundState, utcnow

log = logging.getLogger(__name__)

# Runs of one round whose worker died before the round is failed (an operator can retry it).
MAX_AGGREGATION_RUNS = 3


def _stale(cutoff: datetime) -> ColumnElement[bool]:
    """Aggregating, with no sign of a worker since `cutoff`."""
    last_seen = func.coalesce(Round.heartbeat_at, Round.closed_at, Round.opened_at)
    return (Round.state == RoundState.AGGREGATING) & (last_seen < cutoff)


def _moved(result: object) -> bool:
    return cast(CursorResult[Any], result).rowcount == 1


def requeue_stale_rounds(
    *, sessions: sessionmaker[Session], celery: Celery, stale_s: float, now: datetime | None = None
) -> dict[str, list[int]]:
    """Queue again each aggregating round without a live worker, or fail it after
    MAX_AGGREGATION_RUNS runs; the ids queued and failed."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_s)
    requeued: list[int] = []
    failed: list[int] = []
    with sessions() as session:
        stale = session.execute(select(Round.id, Round.attempts).where(_stale(cutoff))).all()
        for round_id, attempts in stale:
            where = (Round.id == round_id) & _stale(cutoff)
            if attempts >= MAX_AGGREGATION_RUNS:
                error = (
                    f"aggregation started {attempts} times and its worker stopped each time; "
                    "retry it with `tessera round retry`"
                )
                if _moved(
                    session.execute(
                        update(Round).where(where).values(state=RoundState.FAILED, error=error)
                    )
                ):
                    failed.append(round_id)
                session.commit()
                continue
            # The heartbeat moves on, so the next pass waits another stale period for a worker.
            moved = _moved(session.execute(update(Round).where(where).values(heartbeat_at=now)))
            session.commit()
            if not moved:
                continue
            try:
                send_aggregation(celery, round_id)
            except Exception:
                log.exception("could not queue a stuck round again", extra={"round_id": round_id})
                continue
            requeued.append(round_id)
    if requeued or failed:
        log.warning("stuck rounds", extra={"requeued": requeued, "failed": failed})
    return {"requeued": requeued, "failed": failed}


def retry_round(*, session: Session, celery: Celery, round_id: int) -> bool:
    """Aggregate an aggregating or failed round again, now; False if it is in another state.

    Raises EnqueueError if the task cannot be sent (the round stays aggregating, and the round
    loop queues it again once it looks stale).
    """
    moved = _moved(
        session.execute(
            update(Round)
            .where(
                Round.id == round_id,
                Round.state.in_([RoundState.AGGREGATING, RoundState.FAILED]),
            )
            .values(state=RoundState.AGGREGATING, attempts=0, heartbeat_at=utcnow(), error=None)
        )
    )
    session.commit()
    if not moved:
        return False
    try:
        send_aggregation(celery, round_id)
    except Exception as error:
        log.exception("could not queue a retried round", extra={"round_id": round_id})
        raise EnqueueError(f"could not enqueue the aggregation of round {round_id}") from error
    log.info("round retried", extra={"round_id": round_id})
    return True


def fail_round(*, session: Session, round_id: int, why: str) -> bool:
    """Fail an aggregating round with `why`; False if it is not aggregating (a worker that
    finishes it later publishes nothing: its final commit needs the round aggregating)."""
    moved = _moved(
        session.execute(
            update(Round)
            .where(Round.id == round_id, Round.state == RoundState.AGGREGATING)
            .values(state=RoundState.FAILED, error=why)
        )
    )
    session.commit()
    if moved:
        log.warning("round failed by hand", extra={"round_id": round_id})
    return moved
