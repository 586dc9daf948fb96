"""Generation jobs that would never run: queued again, or failed visibly, within a minute or so.

- A running job whose worker died. The worker beats a heartbeat on the rows of the batch it
  runs (`services.inference.crud.beat_batch`). A running job that leads its own run and whose
  heartbeat is older than TESSERA_TASK_STALE_S has lost its worker: the inference API's
  housekeeping loop puts it and its batch back in the queue and sends a message for each, and
  after MAX_JOB_RUNS runs whose worker died fails it and its batch with an error that says so,
  announced on each job's channel so that its event stream ends at once. (Redis would
  redeliver the dead worker's message only after its visibility timeout,
  TESSERA_TASK_TIME_LIMIT_S + 300 s; that late message is one more wake-up, which finds the
  job done or queued.)
- Queued jobs whose messages were lost (a Redis that restarted without its data): when fewer
  messages wait in the queue than jobs are queued, and the oldest queued job has waited
  TESSERA_TASK_STALE_S, the loop sends the missing messages. A message asks a worker for the
  next queued job, so one too many costs a worker a database read, never a second run.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any, cast

import redis
from celery import Celery
from redis.exceptions import RedisError
from sqlalchemy import ColumnElement, CursorResult, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from services.inference.messages import send_wakeup
from tessera.events import INFERENCE_QUEUE, generation_channel
from tessera.models import GenerationJob, JobState, utcnow
from tessera.queue import pending_messages
from tessera.schemas import as_utc
from tessera.service.resources import Resources

log = logging.getLogger(__name__)

LOOP_NAME = "stalled-jobs"
# Runs of one job whose worker died before the job is failed (a job that kills its worker,
# by running out of memory say, must not take down every worker in turn).
MAX_JOB_RUNS = 3


def _stalled(cutoff: datetime) -> ColumnElement[bool]:
    """Running on its own account, with no sign of its worker since `cutoff`."""
    last_seen = func.coalesce(GenerationJob.heartbeat_at, GenerationJob.started_at)
    return (
        (GenerationJob.state == JobState.RUNNING)
        & GenerationJob.batch_leader.is_(None)
        & (last_seen < cutoff)
    )


def _moved(result: object) -> bool:
    return cast(CursorResult[Any], result).rowcount >= 1


def requeue_stalled_jobs(
    *,
    sessions: sessionmaker[Session],
    celery: Celery,
    redis_client: redis.Redis | None,
    stale_s: float,
    now: datetime | None = None,
) -> dict[str, list[str]]:
    """Queue again each running job whose worker stopped, with its batch, or fail it after
    MAX_JOB_RUNS runs; the ids queued again and failed."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_s)
    requeued: list[str] = []
    failed: list[str] = []
    with sessions() as session:
        stalled = session.execute(
            select(GenerationJob.id, GenerationJob.attempts).where(_stalled(cutoff))
        ).all()
        for job_id, attempts in stalled:
            where = (GenerationJob.id == job_id) & _stalled(cutoff)
            if attempts >= MAX_JOB_RUNS:
                failed.extend(_fail(session, job_id, where, attempts, now, redis_client))
                continue
            back = crud.requeue_batch(session=session, leader_id=job_id, where=_stalled(cutoff))
            requeued.extend(_wake(celery, back))
    if requeued or failed:
        log.warning("stalled generation jobs", extra={"requeued": requeued, "failed": failed})
    return {"requeued": requeued, "failed": failed}


def wake_lost_jobs(
    *,
    sessions: sessionmaker[Session],
    celery: Celery,
    redis_client: redis.Redis,
    stale_s: float,
    now: datetime | None = None,
) -> list[str]:
    """Send the messages missing for queued jobs (lost with Redis's data); the jobs sent for."""
    now = now or utcnow()
    with sessions() as session:
        queued = session.execute(
            select(GenerationJob.id, GenerationJob.created_at)
            .where(GenerationJob.state == JobState.QUEUED)
            .order_by(GenerationJob.created_at, GenerationJob.id)
        ).all()
    if not queued or as_utc(queued[0][1]) > now - timedelta(seconds=stale_s):
        return []
    missing = len(queued) - pending_messages(redis_client, INFERENCE_QUEUE)
    if missing <= 0:
        return []
    woken = _wake(celery, [job_id for job_id, _ in queued[:missing]])
    log.warning("queued generation jobs had no message; sent again", extra={"jobs": woken})
    return woken


def _wake(celery: Celery, job_ids: list[str]) -> list[str]:
    """A message for each job; the ids sent for (a failed send is retried at the next pass:
    the job is queued, and its message missing)."""
    sent = []
    for job_id in job_ids:
        try:
            send_wakeup(celery, job_id)
        except Exception:
            log.exception("could not queue a generation job again", extra={"job_id": job_id})
            break
        sent.append(job_id)
    return sent


def _fail(
    session: Session,
    job_id: str,
    where: ColumnElement[bool],
    attempts: int,
    now: datetime,
    redis_client: redis.Redis | None,
) -> list[str]:
    """Fail a stalled job and the jobs of its batch; their ids (none if another replica did)."""
    error = f"the worker running this job stopped {attempts} times; the job was given up"
    batch = [job_id, *crud.batch_followers(session=session, leader_id=job_id)]
    moved = session.execute(
        update(GenerationJob)
        .where(where)
        .values(state=JobState.FAILED, error=error, finished_at=now)
    )
    if not _moved(moved):
        session.rollback()
        return []
    session.execute(
        update(GenerationJob)
        .where(GenerationJob.id.in_(batch[1:]), GenerationJob.state == JobState.RUNNING)
        .values(state=JobState.FAILED, error=error, finished_at=now)
    )
    session.commit()
    for failed in batch:
        _announce_failure(redis_client, failed, error, now)
    return batch


def _announce_failure(
    redis_client: redis.Redis | None, job_id: str, error: str, now: datetime
) -> None:
    """The terminal event on the job's channel (its streams also re-read the row)."""
    if redis_client is None:
        return
    event = {
        "id": job_id,
        "state": "failed",
        "step": 0,
        "total_steps": 0,
        "error": error,
        "at": now.isoformat(),
    }
    try:
        redis_client.publish(generation_channel(job_id), json.dumps(event))
    except RedisError as failure:
        log.warning("failure not announced", extra={"job_id": job_id, "error": str(failure)})


def check_stalled_jobs(resources: Resources) -> dict[str, list[str]]:
    """One pass of the inference API's housekeeping loop."""
    settings = resources.settings
    stalled = requeue_stalled_jobs(
        sessions=resources.sessions,
        celery=resources.celery,
        redis_client=resources.redis,
        stale_s=settings.task_stale_s,
    )
    lost = wake_lost_jobs(
        sessions=resources.sessions,
        celery=resources.celery,
        redis_client=resources.redis,
        stale_s=settings.task_stale_s,
    )
    return {**stalled, "woken": lost}
