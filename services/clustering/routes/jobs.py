"""Re-clustering jobs: read one (to poll it), or the newest."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from services.clustering import jobs
from services.clustering.routes.errors import http_error
from services.clustering.schemas import ClusteringJobOut
from tessera.models import Clustering, ClusteringJob
from tessera.schemas import RowId
from tessera.service.auth import OperatorDep
from tessera.service.deps import SessionDep

router = APIRouter(prefix="/v1/clustering-jobs", tags=["clusterings"])


def job_out(session: Session, job: ClusteringJob) -> ClusteringJobOut:
    made = None if job.clustering_id is None else session.get(Clustering, job.clustering_id)
    return ClusteringJobOut(
        id=job.id,
        state=job.state.value,
        trigger=job.trigger,
        params=job.params,
        base_version=job.base_version,
        clustering_version=None if made is None else made.version,
        error=job.error,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


@router.get("", summary="The newest re-clustering jobs, newest first (operators)")
def list_jobs(
    _operator: OperatorDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[ClusteringJobOut]:
    return [job_out(session, job) for job in jobs.recent_jobs(session=session, limit=limit)]


@router.get(
    "/{job_id}",
    summary="A re-clustering job's state: poll it after POST /v1/clusterings (operators)",
    responses={404: {"description": "no such job"}},
)
def get_job(job_id: RowId, _operator: OperatorDep, session: SessionDep) -> ClusteringJobOut:
    try:
        job = jobs.require_job(session=session, job_id=job_id)
    except jobs.NoSuchJobError as error:
        raise http_error(error) from error
    return job_out(session, job)
