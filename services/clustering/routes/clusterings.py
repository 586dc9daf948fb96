"""Clusterings: queue a new version (a worker makes it), read the current one."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy.orm import Session

from services.clustering import crud, jobs
from services.clustering.routes.errors import http_error
from services.clustering.routes.jobs import job_out
from services.clustering.schemas import (
    ClusteringCreate,
    ClusteringJobOut,
    ClusteringOut,
    ClusterOut,
)
from tessera.models import Clustering, Role
from tessera.service.auth import GeneratorDep, OperatorDep
from tessera.service.deps import CeleryDep, SessionDep

router = APIRouter(prefix="/v1/clusterings", tags=["clusterings"])


def clustering_out(
    session: Session, clustering: Clustering, *, with_members: bool = True
) -> ClusteringOut:
    """The clustering; without `with_members`, each cluster's members are left out (null)."""
    members = crud.members_of(session=session, clustering=clustering) if with_members else None
    return ClusteringOut(
        id=clustering.id,
        version=clustering.version,
        algorithm=clustering.algorithm,
        params=clustering.params,
        metrics=clustering.metrics,
        clusters=[
            ClusterOut(
                label=c.label,
                size=c.size,
                members=None if members is None else members.get(c.label, []),
            )
            for c in crud.clusters_of(session=session, clustering=clustering)
        ],
        created_at=clustering.created_at,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Queue a re-clustering of every enabled device's task vectors into a new version",
    description="A worker runs it; poll the job at `GET /v1/clustering-jobs/{id}` (its "
    "`Location`) until it has succeeded, with the version it made, or failed, with why.",
    responses={
        409: {"description": "no device has task vectors, or a re-clustering is already queued"},
        422: {"description": "bad or contradictory options"},
    },
)
def create_clustering(
    body: ClusteringCreate,
    _operator: OperatorDep,
    session: SessionDep,
    celery: CeleryDep,
    response: Response,
) -> ClusteringJobOut:
    try:
        crud.check_options(
            method=body.method,
            k=body.k,
            distance_threshold=body.distance_threshold,
            min_cluster_size=body.min_cluster_size,
        )
        crud.require_something_to_cluster(session=session)
        job = jobs.submit_job(
            session=session, celery=celery, params=body.model_dump(), trigger=jobs.OPERATOR
        )
    except crud.ClusteringStateError as error:
        session.rollback()
        raise http_error(error) from error
    response.headers["Location"] = f"/v1/clustering-jobs/{job.id}"
    return job_out(session, job)


@router.get(
    "/current",
    summary="The current clustering: clusters and sizes, and for operators their members",
    description="A generation client sees each cluster's label and size; which device is in "
    "which cluster (`members`) is for operators only, null for other callers.",
    responses={404: {"description": "no clustering yet"}},
)
def get_current_clustering(caller: GeneratorDep, session: SessionDep) -> ClusteringOut:
    try:
        clustering = crud.require_current_clustering(session=session)
    except crud.ClusteringStateError as error:
        raise http_error(error) from error
    return clustering_out(session, clustering, with_members=caller.role == Role.OPERATOR)
