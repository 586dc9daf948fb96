"""LoRA update uploads: reading the body under its limit, and the rejection metric's reasons."""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import AsyncIterator

import anyio
from fastapi import HTTPException, Request, status
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.aggregator.deps import base_model_facts
from tessera.config import Settings
from tessera.lora import LoraFileError
from tessera.lora.files import KNOWN_KEY, largest_update_bytes
from tessera.metrics import UPDATES_REJECTED, RejectionReason
from tessera.service.resources import Resources
from tessera.service.slots import ClientSlots

log = logging.getLogger(__name__)

# Every path under it gets the upload size limit instead of the JSON one (see create_app).
UPLOAD_PREFIX = "/v1/rounds/"
_UPDATE_PATH = re.compile(r"^/v1/rounds/[^/]+/updates/[^/]+$")
SPOOL_MEMORY_BYTES = 1024 * 1024  # a body larger than this waits on disk until it is whole
UPLOADS_PER_DEVICE = 2  # update bodies one device may be sending at once
UPLOAD_SLOT_TTL_S = 600.0  # an upload slot a dead process held lapses after this
UPLOAD_RETRY_AFTER_S = 5


def reject(reason: RejectionReason) -> None:
    UPDATES_REJECTED.labels(reason=reason.value).inc()


def too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        detail=f"the update is larger than the limit of {limit} bytes (TESSERA_MAX_UPLOAD_BYTES; "
        "by default the base model's largest valid update)",
        headers={"Connection": "close"},
    )


def upload_limit(settings: Settings) -> int:
    """TESSERA_MAX_UPLOAD_BYTES, or else the largest update the base model can accept."""
    if settings.max_upload_bytes is not None:
        return settings.max_upload_bytes
    facts = base_model_facts(settings.base_model, settings.lora_targets, settings.task_encoder)
    return largest_update_bytes(facts.lora_spec)


async def read_body(request: Request, *, limit: int) -> bytes:
    """The request body, spooled to a temporary file as it streams in (in memory only while
    small), then read once; 413 as soon as it passes `limit` bytes. (A body that stalls is the
    body-limit middleware's 408.)"""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    received = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as spool:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large(limit)
            spool.write(chunk)  # buffered: a chunk rarely reaches the disk on its own
        spool.seek(0)
        return await anyio.to_thread.run_sync(spool.read)


@contextlib.asynccontextmanager
async def upload_slot(request: Request, client_id: int) -> AsyncIterator[None]:
    """Hold one of the device's UPLOADS_PER_DEVICE slots while its body arrives; 429 with
    Retry-After when it holds them all. While Redis does not answer, uploads go unlimited
    (logged): the rest of an upload does not need Redis."""
    resources: Resources = request.app.state.resources
    slots = ClientSlots(
        resources.async_redis, kind="uploads", cap=UPLOADS_PER_DEVICE, ttl_s=UPLOAD_SLOT_TTL_S
    )
    holder = str(client_id)
    try:
        member = await slots.acquire(holder)
    except (RedisError, OSError) as error:
        log.warning("upload slots unavailable; not limited", extra={"error": str(error)})
        yield
        return
    if member is None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"this device is already sending {UPLOADS_PER_DEVICE} uploads; "
            "retry when one has finished",
            headers={"Retry-After": str(UPLOAD_RETRY_AFTER_S)},
        )
    try:
        yield
    finally:
        with contextlib.suppress(RedisError, OSError):
            await slots.release(holder, member)


def rejection_reason(error: LoraFileError) -> RejectionReason:
    """The metric's reason for a refused file, from the facts the validator reports."""
    if error.key in ("base_model_id", "base_model_hash"):
        return RejectionReason.WRONG_BASE_MODEL
    if error.key == "rank" or isinstance(error.expected, list):
        return RejectionReason.WRONG_SHAPE  # a rank out of range, or a tensor of the wrong shape
    if error.expected == KNOWN_KEY:
        return RejectionReason.UNKNOWN_KEYS
    if error.expected == "0 NaN/inf":
        return RejectionReason.NOT_FINITE
    return RejectionReason.BAD_FORMAT  # unparseable, wrong format tag, a missing key, bad dtype


class CountOversizedUploads:
    """Count 413 answers to update uploads as `too_large` rejections.

    Most of them come from the body-size middleware, which answers before any route runs; this
    sits outside it, so it sees those and the route's own 413s alike, once each.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _UPDATE_PATH.match(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 413:
                reject(RejectionReason.TOO_LARGE)
            await send(message)

        await self.app(scope, receive, counting_send)
