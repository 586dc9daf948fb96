"""Error responses: every 4xx says which field or limit is wrong, and never echoes the input.

A backend that fails (the object store, Redis or the queue, the database's connection) is a 503
with `Retry-After` and a message naming the backend, never the backend's own error text.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kombu.exceptions import OperationalError as QueueError
from starlette.exceptions import HTTPException

from tessera.storage import StorageError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
"""What a 503 tells the client to wait: a backend blip usually passes within seconds."""

_BACKENDS: tuple[tuple[type[Exception], str], ...] = (
    (StorageError, "the object store"),
    (redis.exceptions.ConnectionError, "Redis"),
    (redis.exceptions.TimeoutError, "Redis"),
    (QueueError, "the job queue"),
    (sqlalchemy.exc.OperationalError, "the database"),
    (sqlalchemy.exc.TimeoutError, "the database"),  # no pooled connection came free in time
)


def _describe(error: dict[str, Any]) -> dict[str, Any]:
    # Pydantic's "input" is left out on purpose: it may hold an embedding or a secret.
    return {"loc": list(error.get("loc", ())), "msg": error.get("msg"), "type": error.get("type")}


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        status_code=422, content={"detail": [_describe(dict(e)) for e in exc.errors()]}
    )


def unavailable(backend: str) -> JSONResponse:
    """The 503 of a backend that failed: what to retry and when, no internal text."""
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": f"{backend} is unavailable; retry after {RETRY_AFTER_S} s"},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _backend_error(request: Request, exc: Exception) -> JSONResponse:
    backend = next(name for kind, name in _BACKENDS if isinstance(exc, kind))
    log.warning(
        "a backend failed during a request",
        extra={"backend": backend, "path": request.url.path, "error": type(exc).__name__},
        exc_info=exc,
    )
    return unavailable(backend)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's answer, plus `Retry-After` on a 503 that has none."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
        headers = dict(exc.headers or {})
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
        exc = HTTPException(exc.status_code, detail=exc.detail, headers=headers)
    return await http_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    for kind, _name in _BACKENDS:
        app.add_exception_handler(kind, _backend_error)
