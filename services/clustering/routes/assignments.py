"""Assignments: place a device in the current clustering, read a device's cluster."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlalchemy.exc import IntegrityError

from services.clustering import crud, jobs
from services.clustering.routes.errors import concurrent_write, http_error
from services.clustering.schemas import AssignmentCreate, AssignmentOut
from tessera.models import Assignment, Clustering, Role
from tessera.schemas import RowId
from tessera.service.auth import AssignerDep, PrincipalDep
from tessera.service.deps import ResourcesDep, SessionDep

router = APIRouter(prefix="/v1/assignments", tags=["assignments"])


def assignment_out(clustering: Clustering, assignment: Assignment) -> AssignmentOut:
    return AssignmentOut(
        client_id=assignment.client_id,
        clustering_version=clustering.version,
        label=assignment.label,
        similarity=assignment.similarity,
    )


@router.post(
    "",
    summary="Assign a device to its nearest current cluster (after it uploads task vectors)",
    responses={
        404: {"description": "unknown client, or no task vectors"},
        409: {
            "description": "not an enabled device, vectors of another dimension, or no "
            "clustering yet and too many devices for a request (a re-clustering job is queued)"
        },
    },
)
def assign(
    body: AssignmentCreate,
    _caller: AssignerDep,
    session: SessionDep,
    resources: ResourcesDep,  # its Celery app only where a job is queued: no Redis otherwise
) -> AssignmentOut:
    try:
        assignment = crud.assign_device(
            session=session,
            client_id=body.client_id,
            large_n=resources.settings.clustering_large_n,
        )
        session.commit()
    except crud.FirstClusteringTooLargeError as error:
        session.rollback()
        job = jobs.queued_or_submit(
            session=session, celery=resources.celery, params={}, trigger=jobs.ASSIGNMENT
        )
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"{error}: re-clustering job {job.id} is queued; the device is assigned "
            "when it has succeeded",
        ) from error
    except crud.ClusteringStateError as error:
        session.rollback()
        raise http_error(error) from error
    except IntegrityError as error:
        session.rollback()
        raise concurrent_write() from error
    clustering = session.get_one(Clustering, assignment.clustering_id)
    return assignment_out(clustering, assignment)


@router.get(
    "/{client_id}",
    summary="A device's cluster in the current clustering (operators, or the device itself)",
    responses={
        403: {"description": "a device asking for another's, or a generation client"},
        404: {"description": "no clustering, or the client has no assignment in it"},
    },
)
def get_assignment(client_id: RowId, principal: PrincipalDep, session: SessionDep) -> AssignmentOut:
    is_self = principal.role == Role.DEVICE and principal.client_id == client_id
    if principal.role != Role.OPERATOR and not is_self:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="a device may read only its own assignment; other roles need operator",
        )
    try:
        clustering, assignment = crud.current_assignment(session=session, client_id=client_id)
    except crud.ClusteringStateError as error:
        raise http_error(error) from error
    return assignment_out(clustering, assignment)
