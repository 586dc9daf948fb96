"""Re-clustering jobs: queued by an operator or by drift, run by a worker, reaped like rounds.

Re-clustering reads every device's task vectors, so it runs in a worker (`services.worker.
clustering`), never in a request: the API answers 202 with a job that the operator polls. At
most one job is queued or running at a time. A job is a leased row (`tessera.leases`): the
aggregator's round loop queues it again when its worker stops beating, fails it after
MAX_JOB_RUNS dead runs, and queues a drift job when too many devices sit far from their
centroid (`queue_drift_job`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from services.clustering.crud import ClusteringStateError, current_clustering
from tessera.events import AGGREGATION_QUEUE, TASK_RECLUSTER
from tessera.leases import Lease, requeue_stale
from tessera.models import Assignment, ClusteringJob, JobState

log = logging.getLogger(__name__)

# Runs of one job whose worker died before the job is failed (a job that kills its worker, by
# running out of memory say, must not take down every worker in turn).
MAX_JOB_RUNS = 3
MAX_ERROR_CHARS = 2000
ACTIVE = (JobState.QUEUED, JobState.RUNNING)
OPERATOR, DRIFT, ASSIGNMENT = "operator", "drift", "assignment"


class ActiveJobError(ClusteringStateError):
    """A re-clustering is already queued or running."""


class NoSuchJobError(ClusteringStateError):
    """No re-clustering job has the id asked for."""


def send_job(celery: Celery, job_id: int) -> None:
    """Queue a job's message (no result: the worker records it on the job's row)."""
    celery.send_task(TASK_RECLUSTER, args=[job_id], queue=AGGREGATION_QUEUE, ignore_result=True)


def active_job(*, session: Session) -> ClusteringJob | None:
    """The job queued or running, if any."""
    return session.scalar(
        select(ClusteringJob).where(ClusteringJob.state.in_(ACTIVE)).order_by(ClusteringJob.id)
    )


def require_job(*, session: Session, job_id: int) -> ClusteringJob:
    job = session.get(ClusteringJob, job_id)
    if job is None:
        raise NoSuchJobError("no re-clustering job has this id")
    return job


def recent_jobs(*, session: Session, limit: int) -> list[ClusteringJob]:
    """The newest jobs, newest first."""
    return list(
        session.scalars(select(ClusteringJob).order_by(ClusteringJob.id.desc()).limit(limit))
    )


def _already(active: ClusteringJob) -> ActiveJobError:
    return ActiveJobError(
        f"re-clustering job {active.id} is already {active.state.value}: follow it at "
        f"GET /v1/clustering-jobs/{active.id}"
    )


def submit_job(
    *, session: Session, celery: Celery, params: dict[str, Any], trigger: str
) -> ClusteringJob:
    """Queue a re-clustering with `params` (`crud.recluster`'s options), commit, send it.

    ActiveJobError while another is queued or running. A message that cannot be sent is logged
    and left to the round loop, which sends a queued job again once it looks stale.
    """
    active = active_job(session=session)
    if active is not None:
        raise _already(active)
    current = current_clustering(session=session)
    job = ClusteringJob(
        state=JobState.QUEUED,
        trigger=trigger,
        params=params,
        base_version=None if current is None else current.version,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError as error:  # another process queued one since (migration 0008's index)
        session.rollback()
        active = active_job(session=session)
        if active is None:
            raise ActiveJobError("another re-clustering job was queued at the same time") from error
        raise _already(active) from error
    try:
        send_job(celery, job.id)
    except Exception:
        log.exception(
            "could not send a re-clustering job; the round loop will", extra={"id": job.id}
        )
    log.info("re-clustering queued", extra={"job_id": job.id, "trigger": trigger})
    return job


def queued_or_submit(
    *, session: Session, celery: Celery, params: dict[str, Any], trigger: str
) -> ClusteringJob:
    """The job queued or running, else a new one (`submit_job`)."""
    active = active_job(session=session)
    if active is not None:
        return active
    try:
        return submit_job(session=session, celery=celery, params=params, trigger=trigger)
    except ActiveJobError:  # another request queued one meanwhile
        session.rollback()
        found = active_job(session=session)
        if found is None:
            raise
        return found


def _stale(cutoff: datetime) -> ColumnElement[bool]:
    """Queued or running, with no sign of a worker since `cutoff`."""
    last_seen = func.coalesce(
        ClusteringJob.heartbeat_at, ClusteringJob.started_at, ClusteringJob.created_at
    )
    return ClusteringJob.state.in_(ACTIVE) & (last_seen < cutoff)


def _failed_values(attempts: int, now: datetime) -> dict[str, Any]:
    error = f"re-clustering started {attempts} times and its worker stopped each time"
    return {"state": JobState.FAILED, "error": error, "finished_at": now}


JOB_LEASE = Lease(
    what="clustering job",
    model=ClusteringJob,
    stale=_stale,
    send=send_job,
    requeue_values={"state": JobState.QUEUED},
    failed_values=_failed_values,
    max_runs=MAX_JOB_RUNS,
)


def requeue_stale_jobs(
    *, sessions: sessionmaker[Session], celery: Celery, stale_s: float, now: datetime | None = None
) -> dict[str, list[int]]:
    """Queue again each job without a live worker, or fail it after MAX_JOB_RUNS runs."""
    return requeue_stale(JOB_LEASE, sessions=sessions, celery=celery, stale_s=stale_s, now=now)


def far_share(*, session: Session, clustering_id: int, similarity: float) -> tuple[float, int]:
    """The share of a clustering's assigned devices less similar than `similarity` to their
    centroid, and how many are assigned: one aggregate query, whatever the population."""
    far = func.count(case((Assignment.similarity < similarity, 1)))
    total, count_far = session.execute(
        select(func.count(Assignment.id), far).where(Assignment.clustering_id == clustering_id)
    ).one()
    return (0.0 if not total else float(count_far or 0) / total), int(total)


def queue_drift_job(
    *,
    sessions: sessionmaker[Session],
    celery: Celery,
    share_limit: float,
    similarity: float,
) -> int | None:
    """Queue a re-clustering when the current clustering has drifted; the job's id, or None.

    Drift: more than `share_limit` of the assigned devices are less similar than `similarity`
    to their centroid, and more than when the clustering was made (new devices, or devices
    whose task vectors changed, landed far from every centroid). At most one drift job per
    clustering version, none while another job is queued or running; 0 turns it off.
    """
    if share_limit <= 0:
        return None
    with sessions() as session:
        current = current_clustering(session=session)
        if current is None or active_job(session=session) is not None:
            return None
        already = session.scalar(
            select(ClusteringJob.id).where(
                ClusteringJob.trigger == DRIFT, ClusteringJob.base_version == current.version
            )
        )
        if already is not None:
            return None
        share, assigned = far_share(
            session=session, clustering_id=current.id, similarity=similarity
        )
        made_with = float(current.metrics.get("far_share") or 0.0)
        if assigned == 0 or share <= share_limit or share <= made_with:
            return None
        params = {key: value for key, value in current.params.items() if value is not None}
        try:
            job = submit_job(session=session, celery=celery, params=params, trigger=DRIFT)
        except ActiveJobError:
            return None
    log.warning(
        "clusters drifted: re-clustering queued",
        extra={"job_id": job.id, "far_share": round(share, 3), "version": current.version},
    )
    return job.id
