"""Error responses: every 4xx says which field or limit is wrong, and never echoes the input."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def _describe(error: dict[str, Any]) -> dict[str, Any]:
    # Pydantic's "input" is left out on purpose: it may hold an embedding or a secret.
    return {"loc": list(error.get("loc", ())), "msg": error.get("msg"), "type": error.get("type")}


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        status_code=422, content={"detail": [_describe(dict(e)) for e in exc.errors()]}
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
