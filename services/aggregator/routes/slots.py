"""Upload slots: a large update goes straight to the object store, then is committed here.

`POST .../uploads` opens a slot (a multipart upload, see `services.aggregator.slots`), `GET
.../uploads/{slot}` says which parts the store holds and gives fresh URLs for the others (how an
interrupted upload resumes), and `POST .../uploads/{slot}/commit` joins the parts, validates the
stored object as it streams back (header first; the checks of a direct upload) and counts it as
the device's update like a direct PUT would, or deletes it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import JSONResponse

from services.aggregator.deps import LoraSpecDep
from services.aggregator.routes.updates import (
    UpdateMetadata,
    check_base_version,
    check_round,
    delete_quietly,
    file_refused,
    record_update,
)
from services.aggregator.slots import (
    ExpiredSlotError,
    UnknownSlotError,
    UploadSlot,
    open_slot,
    read_slot,
    sign_slot,
)
from services.aggregator.uploads import too_large, upload_limit
from tessera.config import Settings
from tessera.lora import LoraFileError, LoraSpec, validate_adapter_stream
from tessera.schemas import (
    RowId,
    UpdateReceipt,
    UploadCommit,
    UploadPartOut,
    UploadSlotCreate,
    UploadSlotOut,
)
from tessera.service.auth import DeviceDep, Principal
from tessera.service.deps import CeleryDep, SessionDep, SettingsDep, StoreDep
from tessera.storage import ObjectNotFoundError, ObjectStore, StoredObject, UploadedPart

router = APIRouter(prefix="/v1/rounds", tags=["uploads"])

_SLOT_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such round, or no such slot for this device and round"},
    410: {"description": "the slot has expired: open a new one"},
}


def _slot_out(
    slot: UploadSlot, parts: list[UploadedPart], *, store: ObjectStore, settings: Settings
) -> UploadSlotOut:
    missing = set(slot.missing(parts))
    return UploadSlotOut(
        slot=sign_slot(slot, secret=settings.token_secret.get_secret_value()),
        size=slot.size,
        sha256=slot.sha256,
        part_bytes=slot.part_bytes,
        parts=[
            UploadPartOut(
                number=number,
                size=slot.part_size(number),
                url=store.presigned_part_url(
                    slot.key,
                    upload_id=slot.upload_id,
                    number=number,
                    expires_s=settings.presign_expiry_s,
                )
                if number in missing
                else None,
            )
            for number in range(1, slot.part_count + 1)
        ],
        missing=len(missing),
        expires_at=datetime.fromtimestamp(slot.expires_at, UTC),
    )


def _read(
    token: str, *, round_id: int, client_id: int, settings: Settings, store: ObjectStore
) -> UploadSlot:
    """The device's slot; 404 for an unknown one, 410 (its upload dropped) for an expired one."""
    try:
        return read_slot(
            token,
            secret=settings.token_secret.get_secret_value(),
            round_id=round_id,
            client_id=client_id,
        )
    except UnknownSlotError:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail="no such upload slot for this device and round"
        ) from None
    except ExpiredSlotError as expired:
        with contextlib.suppress(ObjectNotFoundError):
            store.abort_multipart(expired.slot.key, upload_id=expired.slot.upload_id)
        raise HTTPException(
            status.HTTP_410_GONE, detail="the upload slot has expired: open a new one"
        ) from None


def _device_id(device: Principal) -> int:
    """The device's client id (a device principal always has one)."""
    if device.client_id is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="upload slots are for devices")
    return device.client_id


def _ended() -> HTTPException:
    return HTTPException(
        status.HTTP_404_NOT_FOUND,
        detail="this slot's upload has ended (committed or abandoned): open a new slot",
    )


@router.post(
    "/{round_id}/uploads",
    status_code=status.HTTP_201_CREATED,
    summary="Open an upload slot: send a large update straight to the object store",
    description="The answer lists the parts to PUT (each to its presigned URL, `size` bytes, "
    "in any order), then `POST .../uploads/{slot}/commit`. Parts are TESSERA_UPLOAD_PART_BYTES "
    "long, the last one shorter.",
    responses={
        404: {"description": "no such round"},
        409: {"description": "the round is not collecting"},
        413: {"description": "the file is over the upload limit"},
        503: {"description": "the object store is unavailable (Retry-After)"},
    },
)
def create_upload_slot(
    round_id: RowId,
    body: UploadSlotCreate,
    device: DeviceDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
) -> UploadSlotOut:
    check_round(session, celery, round_id)
    limit = upload_limit(settings)
    if body.size > limit:
        raise too_large(limit)
    slot = open_slot(
        store=store,
        round_id=round_id,
        client_id=_device_id(device),
        size=body.size,
        sha256=body.sha256,
        part_bytes=settings.upload_part_bytes,
        expiry_s=settings.upload_slot_expiry_s,
    )
    return _slot_out(slot, [], store=store, settings=settings)


@router.get(
    "/{round_id}/uploads/{slot}",
    summary="The parts of a slot the object store holds, and fresh URLs for the others",
    responses=_SLOT_ERRORS,
)
def get_upload_slot(
    round_id: RowId, slot: str, device: DeviceDep, settings: SettingsDep, store: StoreDep
) -> UploadSlotOut:
    found = _read(
        slot, round_id=round_id, client_id=_device_id(device), settings=settings, store=store
    )
    try:
        parts = store.uploaded_parts(found.key, upload_id=found.upload_id)
    except ObjectNotFoundError:
        raise _ended() from None
    return _slot_out(found, parts, store=store, settings=settings)


@router.post(
    "/{round_id}/uploads/{slot}/commit",
    status_code=status.HTTP_201_CREATED,
    response_model=UpdateReceipt,
    summary="Count the update sent through a slot, once its object is validated",
    description="Joins the parts, then reads the object back from the store (header first) "
    "and checks it as a direct upload is checked, and against the size and sha256 the slot "
    "was opened with. A refused object is deleted. 201 for a first update, 200 when it "
    "replaces the device's earlier one. Safe to repeat.",
    responses={
        **_SLOT_ERRORS,
        200: {"description": "replaced the device's earlier update", "model": UpdateReceipt},
        409: {"description": "parts are missing, or the round is not collecting"},
        422: {"description": "the stored file or the metadata is refused"},
        503: {"description": "the object store or the queue is unavailable (Retry-After)"},
    },
)
def commit_upload(
    round_id: RowId,
    slot: str,
    body: UploadCommit,
    response: Response,
    device: DeviceDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    spec: LoraSpecDep,
) -> UpdateReceipt | JSONResponse:
    found = _read(
        slot, round_id=round_id, client_id=_device_id(device), settings=settings, store=store
    )
    check_base_version(session, body.base_version_id)
    check_round(session, celery, round_id)
    _join(store, found)
    try:
        stored = _validate(store, found, spec)
    except LoraFileError as error:
        delete_quietly(store, found.key)
        return file_refused(error)
    receipt, replaced = record_update(
        session=session,
        store=store,
        celery=celery,
        round_id=round_id,
        client_id=_device_id(device),
        stored=stored,
        meta=UpdateMetadata(body.num_samples, body.base_version_id, body.train_loss),
    )
    if replaced:
        response.status_code = status.HTTP_200_OK
    return receipt


def _join(store: ObjectStore, slot: UploadSlot) -> None:
    """Complete the slot's upload from its parts; 409 naming what is missing. An upload already
    completed (a repeated commit) is left as it is."""
    try:
        parts = store.uploaded_parts(slot.key, upload_id=slot.upload_id)
    except ObjectNotFoundError:
        if store.exists(slot.key):
            return
        raise _ended() from None
    missing = slot.missing(parts)
    if missing:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"{len(missing)} of {slot.part_count} parts are not uploaded whole "
            f"(first: part {missing[0]}): send them, then commit",
        )
    wanted = [part for part in parts if part.number <= slot.part_count]
    store.complete_multipart(slot.key, upload_id=slot.upload_id, parts=wanted)


def _validate(store: ObjectStore, slot: UploadSlot, spec: LoraSpec) -> StoredObject:
    """The stored object, read once as it streams, checked like a direct upload and against the
    slot's size and sha256; LoraFileError otherwise."""
    size = store.size_of(slot.key)
    if size != slot.size:
        raise LoraFileError("the stored file's size differs from the slot's", expected=slot.size)
    digest = hashlib.sha256()

    def hashed(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    with contextlib.closing(store.iter_chunks(slot.key)) as chunks:
        validate_adapter_stream(hashed(chunks), spec, size=size)
    if digest.hexdigest() != slot.sha256:
        raise LoraFileError(
            "the stored file's sha256 differs from the slot's", key="sha256", expected=slot.sha256
        )
    return StoredObject(key=slot.key, size=size, sha256=slot.sha256)
