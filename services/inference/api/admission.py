"""Admission of generation jobs: a cap per client, a cap on the whole queue, and a quota per
client over a time window.

A client may have at most `TESSERA_GENERATION_JOBS_PER_CLIENT` jobs queued or running, the
service at most `TESSERA_GENERATION_QUEUE_CAP`, and a client may submit at most
`TESSERA_GENERATION_QUOTA` jobs within any `TESSERA_GENERATION_QUOTA_WINDOW_S` seconds; beyond
any of them the request is a 429 with `Retry-After`. Fairness between the clients whose jobs
are admitted is the workers' part: they take queued jobs round robin between clients
(`services.inference.crud.next_fair_job`).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tessera.config import Settings
from tessera.models import Client, GenerationJob, JobState, utcnow
from tessera.schemas import as_utc

RETRY_AFTER_S = 10
_ACTIVE = (JobState.QUEUED, JobState.RUNNING)


class AdmissionError(Exception):
    """A job refused for now (429): the client or the queue is at its cap, or the client has
    used its quota."""

    def __init__(self, detail: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


def active_jobs(*, session: Session, client_id: int | None = None) -> int:
    """Jobs queued or running: the client's, or everyone's."""
    query = select(func.count()).select_from(GenerationJob).where(GenerationJob.state.in_(_ACTIVE))
    if client_id is not None:
        query = query.where(GenerationJob.client_id == client_id)
    return int(session.scalar(query) or 0)


def quota_retry_after(
    *, session: Session, settings: Settings, client_id: int, now: datetime | None = None
) -> int | None:
    """Seconds until the client may submit again under its quota; None if it may now."""
    now = now or utcnow()
    since = now - timedelta(seconds=settings.generation_quota_window_s)
    recent = (
        select(GenerationJob.created_at)
        .where(GenerationJob.client_id == client_id, GenerationJob.created_at >= since)
        .order_by(GenerationJob.created_at.desc())
        .limit(settings.generation_quota)
    )
    created = list(session.scalars(recent))
    if len(created) < settings.generation_quota:
        return None
    # The oldest of the last `quota` jobs leaves the window first.
    frees_at = as_utc(created[-1]) + timedelta(seconds=settings.generation_quota_window_s)
    return max(1, math.ceil((frees_at - as_utc(now)).total_seconds()))


def admit(*, session: Session, settings: Settings, client_id: int, lock: bool = False) -> None:
    """Raise AdmissionError if the client or the queue is at its cap, or the client's quota
    is used up.

    `lock=True` takes the client's row for the rest of the transaction first (on PostgreSQL),
    so that one client's concurrent requests count each other's jobs before they commit.
    """
    if lock:
        session.execute(select(Client.id).where(Client.id == client_id).with_for_update())
    wait_s = quota_retry_after(session=session, settings=settings, client_id=client_id)
    if wait_s is not None:
        raise AdmissionError(
            f"this client has submitted {settings.generation_quota} jobs within "
            f"{settings.generation_quota_window_s} s, its quota (TESSERA_GENERATION_QUOTA); "
            f"retry in {wait_s} s",
            retry_after_s=wait_s,
        )
    mine = active_jobs(session=session, client_id=client_id)
    if mine >= settings.generation_jobs_per_client:
        raise AdmissionError(
            f"this client has {mine} jobs queued or running, its limit "
            f"(TESSERA_GENERATION_JOBS_PER_CLIENT); retry when one has finished"
        )
    if active_jobs(session=session) >= settings.generation_queue_cap:
        raise AdmissionError(
            "the generation queue is full (TESSERA_GENERATION_QUEUE_CAP jobs); retry later"
        )
