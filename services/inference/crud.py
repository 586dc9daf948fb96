"""Database reads and writes of the inference service: adapter versions and generation jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
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
    """Mark a job running (again, if a crashed worker had it); False if it is terminal, or
    running as part of another job's batch (that job's run finishes it, or its redelivery
    runs it again)."""
    own = or_(GenerationJob.batch_leader.is_(None), GenerationJob.batch_leader == job_id)
    return _start_running(
        session=session, job_id=job_id, total_steps=total_steps, held=own, leader=None, run=True
    )


def batch_candidates(*, session: Session, leader_id: str, batch_key: str) -> list[GenerationJob]:
    """Jobs that may join `leader_id`'s batch, oldest first: queued ones with the same key, and
    those it had already taken before its worker died."""
    rows = session.scalars(
        select(GenerationJob)
        .where(
            GenerationJob.batch_key == batch_key,
            GenerationJob.id != leader_id,
            _queued_or_held(GenerationJob.batch_leader == leader_id),
        )
        .order_by(GenerationJob.created_at, GenerationJob.id)
    )
    return list(rows)


def batch_followers(*, session: Session, leader_id: str) -> list[str]:
    """Ids of the jobs running in `leader_id`'s batch."""
    return list(
        session.scalars(
            select(GenerationJob.id).where(
                GenerationJob.batch_leader == leader_id,
                GenerationJob.state == JobState.RUNNING,
            )
        )
    )


def join_batch(*, session: Session, job_id: str, leader_id: str, total_steps: int) -> bool:
    """Take a queued job (or one this leader already had) into the leader's batch; False if
    another worker has started it meanwhile."""
    return _start_running(
        session=session,
        job_id=job_id,
        total_steps=total_steps,
        held=GenerationJob.batch_leader == leader_id,
        leader=leader_id,
    )


def _queued_or_held(held: ColumnElement[bool]) -> ColumnElement[bool]:
    """Queued, or running and `held` (by whom a running job may be taken again)."""
    return or_(
        GenerationJob.state == JobState.QUEUED,
        and_(GenerationJob.state == JobState.RUNNING, held),
    )


def _start_running(
    *,
    session: Session,
    job_id: str,
    total_steps: int,
    held: ColumnElement[bool],
    leader: str | None,
    run: bool = False,
) -> bool:
    """Move the job to running from the start, run by `leader`'s batch (None: by itself), if
    it is queued or running and `held`; False if it was neither. `run`: a run of its own starts
    (counted in `attempts`, which the stalled-job loop bounds)."""
    now = utcnow()
    values: dict[str, Any] = {
        "state": JobState.RUNNING,
        "started_at": now,
        "heartbeat_at": now,
        "progress_step": 0,
        "total_steps": total_steps,
        "error": None,
        "batch_leader": leader,
    }
    if run:
        values["attempts"] = GenerationJob.attempts + 1
    started = session.execute(
        update(GenerationJob)
        .where(GenerationJob.id == job_id, _queued_or_held(held))
        .values(**values)
    )
    session.commit()
    return bool(getattr(started, "rowcount", 0))


def beat_batch(*, session: Session, leader_id: str) -> None:
    """Say that the worker running `leader_id` (and the jobs of its batch) is alive."""
    session.execute(
        update(GenerationJob)
        .where(
            GenerationJob.state == JobState.RUNNING,
            or_(GenerationJob.id == leader_id, GenerationJob.batch_leader == leader_id),
        )
        .values(heartbeat_at=utcnow())
    )
    session.commit()


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


def is_terminal(state: JobState) -> bool:
    """Whether a job in `state` will not change any more."""
    return state in (JobState.SUCCEEDED, JobState.FAILED)
