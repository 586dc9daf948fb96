"""A device's LoRA update for a round: checked in full before anything is stored.

Content-addressed: the object's key includes its sha256, so a re-upload writes a new object
beside the accepted one, switches the row to it in one transaction (under the round's row lock,
so a round closing meanwhile either counts it or refuses it), and deletes the old object after
the commit. A refused or failed re-upload deletes only its own object: the accepted update and
its object stay as they were. An object left by a process killed between write and commit is
deleted by the round loop's orphan sweep (`services.aggregator.orphans`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from services.aggregator import crud
from services.aggregator.closing import EnqueueError, close_at_quorum, close_if_due, is_due
from services.aggregator.deps import LoraSpecDep
from services.aggregator.routes.rounds import get_round, not_collecting
from services.aggregator.uploads import (
    read_body,
    reject,
    rejection_reason,
    upload_limit,
    upload_slot,
)
from tessera.federation import RoundConfig, update_key
from tessera.lora import LoraFileError, LoraSpec, validate_adapter_bytes
from tessera.metrics import UPDATES_RECEIVED, RejectionReason
from tessera.models import AdapterVersion, Round, RoundState, UpdateStatus, utcnow
from tessera.schemas import MAX_NUM_SAMPLES, RowId, UpdateReceipt, UpdateRejection
from tessera.service.auth import DeviceDep
from tessera.service.deps import CeleryDep, SessionDep, SettingsDep, StoreDep
from tessera.storage import ObjectStore, StorageError, StoredObject

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/rounds", tags=["updates"])


class _RoundClosedError(Exception):
    """The round stopped collecting between the first check and the database write."""


class _ExcludedError(Exception):
    """An operator excluded the device's update from the round: it cannot be replaced."""


@dataclass(frozen=True)
class UpdateMetadata:
    num_samples: int
    base_version_id: int | None
    train_loss: float | None


def check_round(session: Session, celery: Celery, round_id: int) -> None:
    """404 for an unknown round; 409 unless it is collecting and before its deadline."""
    round_ = get_round(session, round_id)
    close_if_due(session=session, celery=celery, round_=round_)
    if round_.state != RoundState.COLLECTING:
        reject(RejectionReason.ROUND_NOT_OPEN)
        raise not_collecting(round_)
    if round_.config.get("method") == "secure":
        reject(RejectionReason.ROUND_NOT_OPEN)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"round {round_.number} aggregates securely: send a masked input "
            f"(PUT /v1/rounds/{round_.id}/secagg/masked), not an update",
        )
    if is_due(round_, utcnow()):  # still collecting only because its closing failed just now
        reject(RejectionReason.ROUND_NOT_OPEN)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"round {round_.number} is past its deadline",
        )
    session.rollback()  # end the read transaction before the body arrives


def check_base_version(session: Session, base_version_id: int | None) -> None:
    """422 unless `base_version_id` (if given) is a published adapter version."""
    if base_version_id is not None and session.get(AdapterVersion, base_version_id) is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail="base_version_id is not a published adapter version",
        )


def _store_update(
    *,
    session: Session,
    store: ObjectStore,
    celery: Celery,
    spec: LoraSpec,
    round_id: int,
    client_id: int,
    data: bytes,
    meta: UpdateMetadata,
) -> tuple[UpdateReceipt, bool]:
    """Validate, store and record an update, then close the round if it reached quorum."""
    check_base_version(session, meta.base_version_id)
    validate_adapter_bytes(data, spec)  # raises LoraFileError: nothing is stored
    sha256 = hashlib.sha256(data).hexdigest()
    key = update_key(round_id, client_id, sha256)
    # A StorageError is a 503 with Retry-After (tessera.service.errors): the device retries.
    stored = store.put_bytes(key, data, expected_sha256=sha256)
    return record_update(
        session=session,
        store=store,
        celery=celery,
        round_id=round_id,
        client_id=client_id,
        stored=stored,
        meta=meta,
    )


def record_update(
    *,
    session: Session,
    store: ObjectStore,
    celery: Celery,
    round_id: int,
    client_id: int,
    stored: StoredObject,
    meta: UpdateMetadata,
) -> tuple[UpdateReceipt, bool]:
    """Count a stored, validated update as the device's for the round (replacing its earlier
    one), then close the round if it reached quorum. Its object is deleted if it cannot count."""
    key = stored.key
    try:
        if not crud.hold_collecting_round(session=session, round_id=round_id):
            raise _RoundClosedError
        previous = crud.get_update(session=session, round_id=round_id, client_id=client_id)
        # A buffered round takes one update per local round; the same bytes again are a re-send.
        append = RoundConfig.model_validate(session.get_one(Round, round_id).config).buffered
        resent = append and previous is not None and previous.sha256 == stored.sha256
        if previous is not None and previous.status == UpdateStatus.EXCLUDED and not append:
            raise _ExcludedError
        replaced_key = None if previous is None or append else previous.object_key
        if resent:
            assert previous is not None
            row, replaced = previous, False
            session.rollback()
        else:
            row, replaced = crud.upsert_update(
                session=session,
                round_id=round_id,
                client_id=client_id,
                stored=stored,
                num_samples=meta.num_samples,
                base_version_id=meta.base_version_id,
                train_loss=meta.train_loss,
                append=append,
            )
            session.commit()
    except BaseException as error:
        # The round closed while the file was checked and stored, or the database failed: take
        # back the object this request wrote, unless the accepted row is the same content.
        session.rollback()
        _forget_unaccepted(session, store, round_id=round_id, client_id=client_id, key=key)
        if isinstance(error, _RoundClosedError):
            reject(RejectionReason.ROUND_NOT_OPEN)
            raise not_collecting(get_round(session, round_id)) from None
        if isinstance(error, _ExcludedError):
            reject(RejectionReason.NOT_ALLOWED)
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail="an operator excluded this device's update from the round; "
                "it cannot be replaced",
            ) from None
        raise
    if replaced_key is not None and replaced_key != key:
        delete_quietly(store, replaced_key)  # on failure, the orphan sweep deletes it later
    UPDATES_RECEIVED.inc()
    receipt = UpdateReceipt(
        update_id=row.id,
        round_id=round_id,
        client_id=client_id,
        sha256=stored.sha256,
        size_bytes=stored.size,
        num_samples=meta.num_samples,
        replaced=replaced,
        round_state=_state_after_quorum(session, celery, round_id),
    )
    return receipt, replaced


def _state_after_quorum(session: Session, celery: Celery, round_id: int) -> RoundState:
    """Close the round if it reached quorum; its state after. The update is counted already,
    so a failure here is logged, never the upload's answer: the round loop closes the round."""
    try:
        round_ = get_round(session, round_id)
        with contextlib.suppress(EnqueueError):
            if close_at_quorum(session=session, celery=celery, round_=round_):
                session.refresh(round_)
        return round_.state
    except SQLAlchemyError:
        session.rollback()
        log.warning("quorum check failed after an update was counted", exc_info=True)
        return RoundState.COLLECTING  # what it was when the update was counted


def _forget_unaccepted(
    session: Session, store: ObjectStore, *, round_id: int, client_id: int, key: str
) -> None:
    """Delete `key` unless the accepted update of the slot is that very object."""
    accepted = crud.get_update(session=session, round_id=round_id, client_id=client_id)
    accepted_key = None if accepted is None else accepted.object_key
    session.rollback()
    if accepted_key != key:
        delete_quietly(store, key)


def file_refused(error: LoraFileError) -> JSONResponse:
    """The 422 of a refused file: what is wrong and what was expected, never what was found."""
    reject(rejection_reason(error))
    rejection = UpdateRejection(
        detail=error.public, key=error.key, expected=jsonable_encoder(error.expected)
    )
    return JSONResponse(rejection.model_dump(), status_code=422)


def delete_quietly(store: ObjectStore, key: str) -> None:
    try:
        store.delete(key)
    except StorageError:
        log.exception("could not delete an update object; the orphan sweep will")


@router.put(
    "/{round_id}/updates/{client_id}",
    status_code=status.HTTP_201_CREATED,
    response_model=UpdateReceipt,
    summary="Upload (or replace) the device's LoRA update for a round",
    description="The body is the safetensors file itself (Content-Type: "
    "application/octet-stream), at most TESSERA_MAX_UPLOAD_BYTES (by default the base model's "
    "largest valid update: every target module at the highest rank, float32). 201 for a "
    "first upload, 200 when it replaces the device's earlier one.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
    responses={
        200: {"description": "replaced the device's earlier update", "model": UpdateReceipt},
        403: {"description": "the slot is another device's"},
        404: {"description": "no such round"},
        408: {"description": "the body sent nothing for TESSERA_BODY_READ_TIMEOUT_S"},
        409: {
            "description": "the round is not collecting, or an operator excluded the "
            "device's update from it"
        },
        413: {"description": "the file is over the upload limit"},
        429: {"description": "the device is already sending 2 uploads; see Retry-After"},
        422: {"description": "the file or its metadata is refused", "model": UpdateRejection},
        503: {"description": "the object store or the queue is unavailable (Retry-After)"},
    },
)
async def upload_update(
    round_id: RowId,
    client_id: RowId,
    request: Request,
    response: Response,
    device: DeviceDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    spec: LoraSpecDep,
    num_samples: Annotated[
        int, Query(ge=1, le=MAX_NUM_SAMPLES, description="training samples behind the update")
    ],
    base_version_id: Annotated[
        RowId | None, Query(description="the adapter version training started from")
    ] = None,
    train_loss: Annotated[
        float | None, Query(ge=0, allow_inf_nan=False, description="final training loss")
    ] = None,
) -> UpdateReceipt | JSONResponse:
    if client_id != device.client_id:
        reject(RejectionReason.NOT_ALLOWED)
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="a device can only upload its own update"
        )
    await run_in_threadpool(check_round, session, celery, round_id)
    async with upload_slot(request, client_id):
        data = await read_body(request, limit=upload_limit(settings))
    try:
        receipt, replaced = await run_in_threadpool(
            lambda: _store_update(
                session=session,
                store=store,
                celery=celery,
                spec=spec,
                round_id=round_id,
                client_id=client_id,
                data=data,
                meta=UpdateMetadata(num_samples, base_version_id, train_loss),
            )
        )
    except LoraFileError as error:
        return file_refused(error)
    if replaced:
        response.status_code = status.HTTP_200_OK
    return receipt
