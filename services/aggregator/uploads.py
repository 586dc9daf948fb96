"""LoRA update uploads: reading the body under its limit, and the rejection metric's reasons."""

from __future__ import annotations

import re

from fastapi import HTTPException, Request, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.lora import LoraFileError
from tessera.lora.files import KNOWN_KEY
from tessera.metrics import UPDATES_REJECTED, RejectionReason

# Every path under it gets the upload size limit instead of the JSON one (see create_app).
UPLOAD_PREFIX = "/v1/rounds/"
_UPDATE_PATH = re.compile(r"^/v1/rounds/[^/]+/updates/[^/]+$")


def reject(reason: RejectionReason) -> None:
    UPDATES_REJECTED.labels(reason=reason.value).inc()


def too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        detail=f"the update is larger than the limit of {limit} bytes (TESSERA_MAX_UPLOAD_BYTES)",
    )


async def read_body(request: Request, *, limit: int) -> bytes:
    """The request body, read as it streams in; 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


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
