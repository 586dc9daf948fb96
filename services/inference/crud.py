"""Database reads and writes of the inference service: adapter versions and generation jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tessera.models import Adapter, AdapterVersion, GenerationJob, JobState, utcnow


def latest_version(*, session: Session, name: str) -> AdapterVersion | None:
    """The newest published version of the adapter line `name`."""
    return session.scalar(
        select(AdapterVersion)
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .where(Adapter.name == name)
        .order_by(AdapterVersion.version.desc())
        .limit(1)
    )


def version_with_name(*, session: Session, version_id: int) -> tuple[str, AdapterVersion] | None:
    """A version by id, with its adapter line's name."""
    row = session.execute(
        select(Adapter.name, AdapterVersion)
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .where(AdapterVersion.id == version_id)
    ).first()
    return None if row is None else (row[0], row[1])


def find_version(*, session: Session, ref: str) -> tuple[str, AdapterVersion] | None:
    """`ref` is a version id (digits) or an adapter name (its latest version); None if unknown."""
    if ref.isdigit():
        return version_with_name(session=session, version_id=int(ref))
    version = latest_version(session=session, name=ref)
    return None if version is None else (ref, version)


def job_by_idempotency_key(*, session: Session, client_id: int, key: str) -> GenerationJob | None:
    return session.scalar(
        select(GenerationJob).where(
            GenerationJob.client_id == client_id, GenerationJob.idempotency_key == key
        )
    )


def claim_job(*, session: Session, job_id: str, total_steps: int) -> bool:
    """Mark a job running (again, if a crashed worker had it); False if it is already terminal."""
    claimed = session.execute(
        update(GenerationJob)
        .where(
            GenerationJob.id == job_id,
            GenerationJob.state.in_([JobState.QUEUED, JobState.RUNNING]),
        )
        .values(
            state=JobState.RUNNING,
            started_at=utcnow(),
            progress_step=0,
            total_steps=total_steps,
            error=None,
        )
    )
    session.commit()
    return bool(getattr(claimed, "rowcount", 0))


def record_progress(*, session: Session, job_id: str, step: int) -> None:
    session.execute(
        update(GenerationJob)
        .where(GenerationJob.id == job_id, GenerationJob.state == JobState.RUNNING)
        .values(progress_step=step)
    )
    session.commit()


def finish_job(
    *,
    session: Session,
    job_id: str,
    state: JobState,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    progress_step: int | None = None,
) -> datetime:
    """Move a job to a terminal state; returns the time it finished."""
    finished = utcnow()
    values: dict[str, Any] = {"state": state, "finished_at": finished, "error": error}
    if result is not None:
        values["result"] = result
    if progress_step is not None:
        values["progress_step"] = progress_step
    session.execute(update(GenerationJob).where(GenerationJob.id == job_id).values(**values))
    session.commit()
    return finished
