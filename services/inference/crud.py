"""Database reads and writes of the inference service: adapter versions and generation jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from tessera.models import Adapter, AdapterVersion, GenerationJob, JobState, utcnow
from tessera.schemas import as_utc

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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


def next_fair_job(*, session: Session) -> str | None:
    """The queued job to run next, round robin between clients: the oldest queued job of the
    client served least recently (whose latest job started longest ago, or never); None if
    nothing is queued. One client's many jobs never keep another's waiting behind them all."""
    queued = session.execute(
        select(GenerationJob.id, GenerationJob.client_id)
        .where(GenerationJob.state == JobState.QUEUED)
        .order_by(GenerationJob.created_at, GenerationJob.id)
    ).all()
    if not queued:
        return None
    oldest: dict[int, tuple[int, str]] = {}  # client -> (queue position, its oldest job)
    for position, (job_id, client_id) in enumerate(queued):
        oldest.setdefault(client_id, (position, job_id))
    served = dict(
        session.execute(
            select(GenerationJob.client_id, func.max(GenerationJob.started_at))
            .where(GenerationJob.client_id.in_(list(oldest)), GenerationJob.started_at.is_not(None))
            .group_by(GenerationJob.client_id)
        ).all()
    )

    def turn(client_id: int) -> tuple[bool, datetime, int]:
        """Never served first, then served longest ago, then queued longest."""
        last = served.get(client_id)
        return (last is not None, _EPOCH if last is None else as_utc(last), oldest[client_id][0])

    return oldest[min(oldest, key=turn)][1]


def claim_job(*, session: Session, job_id: str, total_steps: int) -> bool:
    """Mark a queued job running, a run of its own (counted in `attempts`, which the stalled-job
    loop bounds); False if it is not queued (another worker took it, or it ended)."""
    return _start_running(
        session=session, job_id=job_id, total_steps=total_steps, leader=None, run=True
    )


def batch_candidates(*, session: Session, leader_id: str, batch_key: str) -> list[GenerationJob]:
    """Queued jobs that may join `leader_id`'s batch (the same batch key), oldest first."""
    rows = session.scalars(
        select(GenerationJob)
        .where(
            GenerationJob.batch_key == batch_key,
            GenerationJob.id != leader_id,
            GenerationJob.state == JobState.QUEUED,
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
    """Take a queued job into the leader's batch; False if another worker has started it."""
    return _start_running(session=session, job_id=job_id, total_steps=total_steps, leader=leader_id)


def _start_running(
    *,
    session: Session,
    job_id: str,
    total_steps: int,
    leader: str | None,
    run: bool = False,
) -> bool:
    """Move a queued job to running from the start, run by `leader`'s batch (None: by itself);
    False if it was not queued. `run`: a run of its own starts (counted in `attempts`)."""
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
        .where(GenerationJob.id == job_id, GenerationJob.state == JobState.QUEUED)
        .values(**values)
    )
    session.commit()
    return bool(getattr(started, "rowcount", 0))


def requeue_batch(
    *, session: Session, leader_id: str, where: ColumnElement[bool] | None = None
) -> list[str]:
    """Put a running job and the jobs of its batch back in the queue (their worker died, or
    could not reach a backend); their ids, leader first (none if the leader was not running,
    or not as `where` says). Commits."""
    leader = (GenerationJob.id == leader_id) & (GenerationJob.state == JobState.RUNNING)
    if where is not None:
        leader = leader & where
    back = {
        "state": JobState.QUEUED,
        "batch_leader": None,
        "progress_step": 0,
        "heartbeat_at": None,
    }
    moved = session.execute(update(GenerationJob).where(leader).values(**back))
    if not getattr(moved, "rowcount", 0):
        session.rollback()
        return []
    followers = batch_followers(session=session, leader_id=leader_id)
    if followers:
        session.execute(
            update(GenerationJob)
            .where(GenerationJob.id.in_(followers), GenerationJob.state == JobState.RUNNING)
            .values(**back)
        )
    session.commit()
    return [leader_id, *followers]


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
