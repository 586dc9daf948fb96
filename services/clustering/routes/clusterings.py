"""Clusterings: run a new version, read the current one."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.clustering import crud
from services.clustering.routes.errors import concurrent_write, http_error
from services.clustering.schemas import ClusteringCreate, ClusteringOut, ClusterOut
from tessera.models import Clustering, Role
from tessera.service.auth import GeneratorDep, OperatorDep
from tessera.service.deps import SessionDep

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
    status_code=status.HTTP_201_CREATED,
    summary="Recluster every enabled device's task vectors into a new version",
    responses={
        409: {"description": "no device has task vectors, or their dimensions differ"},
        422: {"description": "bad or contradictory options"},
    },
)
def create_clustering(
    body: ClusteringCreate, _operator: OperatorDep, session: SessionDep
) -> ClusteringOut:
    try:
        clustering = crud.recluster(
            session=session,
            method=body.method,
            k=body.k,
            seed=body.seed,
            min_cluster_size=body.min_cluster_size,
            distance_threshold=body.distance_threshold,
        )
        session.commit()
    except crud.ClusteringStateError as error:
        session.rollback()
        raise http_error(error) from error
    except IntegrityError as error:
        session.rollback()
        raise concurrent_write() from error
    return clustering_out(session, clustering)


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
