"""Rounds stuck in `aggregating`: queued again when their worker died, retried or failed by hand.

The aggregation task beats a heartbeat on its round (`services.worker.rounds.claim_round`). A
round whose heartbeat (or, before any run, its closing) is older than TESSERA_TASK_STALE_S has
no live worker: the round loop queues it again through `tessera.leases` (which re-clustering
jobs share), and fails it after MAX_AGGREGATION_RUNS runs whose worker died.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, func, update
from sqlalchemy.orm import Session, sessionmaker

from services.aggregator.closing import EnqueueError, send_aggregation
from tessera.leases import Lease, moved, requeue_stale
from tessera.models import Round, RoundState, utcnow

log = logging.getLogger(__name__)

# Runs of one round whose worker died before the round is failed (an operator can retry it).
MAX_AGGREGATION_RUNS = 3


def _stale(cutoff: datetime) -> ColumnElement[bool]:
    """Aggregating, with no sign of a worker since `cutoff`."""
    last_seen = func.coalesce(Round.heartbeat_at, Round.closed_at, Round.opened_at)
    return (Round.state == RoundState.AGGREGATING) & (last_seen < cutoff)


def _failed_values(attempts: int, _now: datetime) -> dict[str, Any]:
    error = (
        f"aggregation started {attempts} times and its worker stopped each time; "
        "retry it with `tessera round retry`"
    )
    return {"state": RoundState.FAILED, "error": error}


ROUND_LEASE = Lease(
    what="round",
    model=Round,
    stale=_stale,
    send=send_aggregation,
    requeue_values={},
    failed_values=_failed_values,
    max_runs=MAX_AGGREGATION_RUNS,
)


def requeue_stale_rounds(
    *, sessions: sessionmaker[Session], celery: Celery, stale_s: float, now: datetime | None = None
) -> dict[str, list[int]]:
    """Queue again each aggregating round without a live worker, or fail it after
    MAX_AGGREGATION_RUNS runs; the ids queued and failed."""
    return requeue_stale(ROUND_LEASE, sessions=sessions, celery=celery, stale_s=stale_s, now=now)


def retry_round(*, session: Session, celery: Celery, round_id: int) -> bool:
    """Aggregate an aggregating or failed round again, now; False if it is in another state.

    Raises EnqueueError if the task cannot be sent (the round stays aggregating, and the round
    loop queues it again once it looks stale).
    """
    changed = moved(
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
    if not changed:
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
    changed = moved(
        session.execute(
            update(Round)
            .where(Round.id == round_id, Round.state == RoundState.AGGREGATING)
            .values(state=RoundState.FAILED, error=why)
        )
    )
    session.commit()
    if changed:
        log.warning("round failed by hand", extra={"round_id": round_id})
    return changed
