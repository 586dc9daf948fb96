"""A device's own resources: its encoded task vectors, and its cluster assignment."""

from __future__ import annotations

import logging
import math

import httpx
from fastapi import APIRouter, HTTPException, status
from sqlalchemy.orm import Session

from services.aggregator import crud
from services.aggregator.deps import BaseModelDep, BaseModelFacts
from services.aggregator.views import adapter_download, round_brief
from tessera.config import Settings
from tessera.federation import GLOBAL_ADAPTER, cluster_adapter_name
from tessera.schemas import DeviceAssignment, TaskVectorsIn, TaskVectorsStored
from tessera.service.auth import DeviceDep, service_headers
from tessera.service.deps import ClusteringHttpDep, SessionDep, SettingsDep, StoreDep
from tessera.storage import ObjectStore
from tessera.tokens import ServiceScope

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/devices/me", tags=["devices"])

NORM_TOLERANCE = 1e-3


def _check_vectors(body: TaskVectorsIn, base_model: BaseModelFacts) -> None:
    """422 unless every vector comes from the task encoder and is L2-normalised."""
    encoder_id, dim = base_model.task_encoder_id, base_model.task_width
    if body.encoder_id != encoder_id:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"encoder_id names another encoder; this federation's task encoder is "
            f"{encoder_id!r}",
        )
    for index, vector in enumerate(body.vectors):
        if len(vector) != dim:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"vector {index} has {len(vector)} values; {encoder_id} gives {dim}",
            )
        norm = math.sqrt(math.fsum(value * value for value in vector))
        if abs(norm - 1.0) > NORM_TOLERANCE:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"vector {index} is not L2-normalised: "
                f"send vectors of norm 1 (within {NORM_TOLERANCE:g})",
            )


def _request_assignment(http: httpx.Client, settings: Settings, client_id: int) -> bool:
    """Ask the clustering service to assign the device now; whether it did."""
    try:
        response = http.post(
            "/v1/assignments",
            json={"client_id": client_id},
            headers=service_headers(settings, ServiceScope.ASSIGN),
        )
    except httpx.HTTPError as error:
        log.warning(
            "clustering service unreachable; device not assigned yet",
            extra={"client_id": client_id, "error": f"{type(error).__name__}: {error}"},
        )
        return False
    if response.is_success:
        return True
    level = logging.WARNING if response.status_code in (404, 409) else logging.ERROR
    log.log(
        level,
        "clustering service did not assign the device",
        extra={"client_id": client_id, "status": response.status_code, "body": response.text[:300]},
    )
    return False


def device_assignment(
    *, session: Session, store: ObjectStore, settings: Settings, client_id: int
) -> DeviceAssignment:
    """The device's cluster in the newest clustering that has it, its start adapter and round."""
    found = crud.latest_assignment(session=session, client_id=client_id)
    label = None if found is None else found[0].label
    start = None
    if label is not None:
        start = crud.latest_version(session=session, name=cluster_adapter_name(label))
    if start is None:
        start = crud.latest_version(session=session, name=GLOBAL_ADAPTER)
    current = crud.latest_round(session=session)
    return DeviceAssignment(
        client_id=client_id,
        cluster=label,
        clustering_version=None if found is None else found[1].version,
        similarity=None if found is None else found[0].similarity,
        start_adapter=None
        if start is None
        else adapter_download(*start, store=store, expires_s=settings.presign_expiry_s),
        current_round=None if current is None else round_brief(current),
    )


@router.post(
    "/task-vectors",
    status_code=status.HTTP_201_CREATED,
    summary="Replace the device's encoded task vectors and get assigned to a cluster",
    responses={422: {"description": "wrong encoder, dimension or norm; the vector is named"}},
)
def upload_task_vectors(
    body: TaskVectorsIn,
    device: DeviceDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    base_model: BaseModelDep,
    clustering: ClusteringHttpDep,
) -> TaskVectorsStored:
    assert device.client_id is not None  # devices are enrolled clients
    _check_vectors(body, base_model)
    stored = crud.replace_task_vectors(
        session=session,
        client_id=device.client_id,
        encoder_id=body.encoder_id,
        vectors=body.vectors,
    )
    session.commit()
    # The vectors are kept whatever happens next: a device not assigned now is at re-clustering.
    if not _request_assignment(clustering, settings, device.client_id):
        return TaskVectorsStored(stored=stored, assignment=None)
    session.expire_all()
    assignment = device_assignment(
        session=session, store=store, settings=settings, client_id=device.client_id
    )
    return TaskVectorsStored(
        stored=stored, assignment=assignment if assignment.cluster is not None else None
    )


@router.get("/assignment", summary="The device's cluster, start adapter and current round")
def get_assignment(
    device: DeviceDep, session: SessionDep, settings: SettingsDep, store: StoreDep
) -> DeviceAssignment:
    assert device.client_id is not None
    return device_assignment(
        session=session, store=store, settings=settings, client_id=device.client_id
    )
