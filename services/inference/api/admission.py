"""Admission of generation jobs: a cap per client and a cap on the whole queue.

A client may have at most `TESSERA_GENERATION_JOBS_PER_CLIENT` jobs queued or running, and the
service at most `TESSERA_GENERATION_QUEUE_CAP`; beyond either the request is a 429 with
`Retry-After`. The per-client cap is what keeps the queue fair: one client can hold only its
share of the queue, so another client's job always finds room (while the queue cap is larger
than the per-client cap) and waits behind at most the queue cap's worth of jobs.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tessera.config import Settings
from tessera.models import Client, GenerationJob, JobState

RETRY_AFTER_S = 10
_ACTIVE = (JobState.QUEUED, JobState.RUNNING)


class AdmissionError(Exception):
    """A job refused for now (429): the client or the queue is at its cap."""

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


def admit(*, session: Session, settings: Settings, client_id: int, lock: bool = False) -> None:
    """Raise AdmissionError if the client or the queue is at its cap.

    `lock=True` takes the client's row for the rest of the transaction first (on PostgreSQL),
    so that one client's concurrent requests count each other's jobs before they commit.
    """
    if lock:
        session.execute(select(Client.id).where(Client.id == client_id).with_for_update())
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
