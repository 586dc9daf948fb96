"""Work that a worker runs under a heartbeat, and the reaper that queues it again when it died.

A round's aggregation and a re-clustering job are both rows a worker claims (counting a run in
`attempts`) and keeps alive by beating `heartbeat_at` (`tessera.heartbeat`). A row whose sign of
life is older than TESSERA_TASK_STALE_S has no live worker: its message was lost, or the worker
died holding it, which Redis would only notice after its visibility timeout. The aggregator's
round loop queues such a row again, and fails it after `max_runs` runs whose worker died. Every
move is one conditional UPDATE, so replicas racing on a row move it once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from celery import Celery
from sqlalchemy import ColumnElement, CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from tessera.models import Base, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """How one kind of leased row is found stale, queued again and given up."""

    what: str  # "round", "clustering job": names it in logs and errors
    model: type[Base]
    stale: Callable[[datetime], ColumnElement[bool]]  # no sign of a worker since the cutoff
    send: Callable[[Celery, int], None]  # the task's message for a row id
    requeue_values: Mapping[str, Any]  # set, with heartbeat_at, when queued again
    failed_values: Callable[[int, datetime], Mapping[str, Any]]  # after `attempts` dead runs
    max_runs: int


def moved(result: object) -> bool:
    """Whether a conditional UPDATE of one row changed it."""
    return cast(CursorResult[Any], result).rowcount == 1


def requeue_stale(
    lease: Lease,
    *,
    sessions: sessionmaker[Session],
    celery: Celery,
    stale_s: float,
    now: datetime | None = None,
) -> dict[str, list[int]]:
    """Queue again each stale row of `lease`, or fail it after its runs; the ids of each."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_s)
    model: Any = lease.model
    requeued: list[int] = []
    failed: list[int] = []
    with sessions() as session:
        stale = session.execute(select(model.id, model.attempts).where(lease.stale(cutoff))).all()
        for row in stale:
            row_id, attempts = int(row[0]), int(row[1])
            where = (model.id == row_id) & lease.stale(cutoff)
            if attempts >= lease.max_runs:
                values = lease.failed_values(attempts, now)
                if moved(session.execute(update(model).where(where).values(**values))):
                    failed.append(row_id)
                session.commit()
                continue
            # The heartbeat moves on, so the next pass waits another stale period for a worker.
            values = {**lease.requeue_values, "heartbeat_at": now}
            is_moved = moved(session.execute(update(model).where(where).values(**values)))
            session.commit()
            if not is_moved:
                continue
            try:
                lease.send(celery, row_id)
            except Exception:
                log.exception(f"could not queue a stuck {lease.what} again", extra={"id": row_id})
                continue
            requeued.append(row_id)
    if requeued or failed:
        log.warning(f"stuck {lease.what}s", extra={"requeued": requeued, "failed": failed})
    return {"requeued": requeued, "failed": failed}
