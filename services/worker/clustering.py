"""A re-clustering job's life in the worker: claim it, recluster under a heartbeat, record it.

The new clustering and the job's success are one commit, so a worker that dies before it leaves
nothing behind, and the round loop's reaper (`services.clustering.jobs.JOB_LEASE`) queues the
job again. A run claims only a queued job: a redelivered or duplicate message finds it running
or finished and does nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy.exc
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services.clustering import crud
from services.clustering.jobs import MAX_ERROR_CHARS
from services.worker.rounds import TRANSIENT_ERRORS
from tessera.config import Settings
from tessera.heartbeat import Heartbeat
from tessera.leases import moved
from tessera.models import ClusteringJob, JobState, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusteringScale:
    """The settings a re-clustering runs under (TESSERA_CLUSTERING_* and the drift threshold)."""

    large_n: int
    silhouette_sample: int
    far_similarity: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ClusteringScale:
        return cls(
            large_n=settings.clustering_large_n,
            silhouette_sample=settings.clustering_silhouette_sample,
            far_similarity=settings.cluster_drift_similarity,
        )


def run_clustering_job(
    job_id: int, *, sessions: sessionmaker[Session], scale: ClusteringScale, stale_s: float
) -> dict[str, Any]:
    """Run a queued job; what came of it. Options the devices at hand refuse fail the job with
    the reason; a connection error puts it back in the queue and propagates (the task retries);
    any other error fails it and propagates."""
    if not _claim(sessions, job_id):
        return {"job_id": job_id, "state": "skipped", "reason": "not queued"}
    beat = Heartbeat.for_stale_after(
        lambda: _beat(sessions, job_id), stale_s=stale_s, name=f"clustering-job-{job_id}"
    )
    try:
        with beat, sessions() as session:
            return _recluster(session, job_id, scale)
    except TRANSIENT_ERRORS:
        _set(sessions, job_id, state=JobState.QUEUED)
        raise
    except Exception as error:
        _fail(sessions, job_id, f"{type(error).__name__}: {error}")
        raise


def _recluster(session: Session, job_id: int, scale: ClusteringScale) -> dict[str, Any]:
    job = session.get_one(ClusteringJob, job_id)
    try:
        clustering = crud.recluster(
            session=session,
            **job.params,
            large_n=scale.large_n,
            silhouette_sample=scale.silhouette_sample,
            far_similarity=scale.far_similarity,
        )
    except crud.ClusteringStateError as error:
        session.rollback()
        _fail_in(session, job_id, str(error))
        return {"job_id": job_id, "state": "failed", "error": str(error)}
    except sqlalchemy.exc.IntegrityError:
        session.rollback()
        why = "another clustering was written at the same time (the first assignment?): queue again"
        _fail_in(session, job_id, why)
        return {"job_id": job_id, "state": "failed", "error": why}
    finished = session.execute(
        update(ClusteringJob)
        .where(ClusteringJob.id == job_id, ClusteringJob.state == JobState.RUNNING)
        .values(state=JobState.SUCCEEDED, clustering_id=clustering.id, finished_at=utcnow())
    )
    if not moved(finished):  # the reaper gave it up meanwhile: its clustering is not kept
        session.rollback()
        return {"job_id": job_id, "state": "skipped", "reason": "no longer running"}
    session.commit()
    log.info("re-clustering done", extra={"job_id": job_id, "version": clustering.version})
    return {"job_id": job_id, "state": "succeeded", "version": clustering.version}


def _claim(sessions: sessionmaker[Session], job_id: int) -> bool:
    """Count a run of a queued job and mark it running; False if it is not queued."""
    now = utcnow()
    with sessions() as session:
        claimed = session.execute(
            update(ClusteringJob)
            .where(ClusteringJob.id == job_id, ClusteringJob.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                attempts=ClusteringJob.attempts + 1,
                started_at=now,
                heartbeat_at=now,
            )
        )
        session.commit()
    return moved(claimed)


def _beat(sessions: sessionmaker[Session], job_id: int) -> None:
    _set(sessions, job_id, heartbeat_at=utcnow())


def _set(sessions: sessionmaker[Session], job_id: int, **values: Any) -> None:
    """Change a running job's row (a best effort: the reaper covers a database that is away)."""
    try:
        with sessions() as session:
            session.execute(
                update(ClusteringJob)
                .where(ClusteringJob.id == job_id, ClusteringJob.state == JobState.RUNNING)
                .values(**values)
            )
            session.commit()
    except sqlalchemy.exc.SQLAlchemyError:
        log.exception("could not update a re-clustering job", extra={"job_id": job_id})


def _fail(sessions: sessionmaker[Session], job_id: int, why: str) -> None:
    with sessions() as session:
        _fail_in(session, job_id, why)


def _fail_in(session: Session, job_id: int, why: str) -> None:
    session.execute(
        update(ClusteringJob)
        .where(ClusteringJob.id == job_id, ClusteringJob.state == JobState.RUNNING)
        .values(state=JobState.FAILED, error=why[:MAX_ERROR_CHARS], finished_at=utcnow())
    )
    session.commit()
    log.warning("re-clustering failed", extra={"job_id": job_id, "error": why[:MAX_ERROR_CHARS]})
