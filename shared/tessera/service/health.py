"""`/healthz` (the process is alive), `/readyz` (its dependencies answer) and `/metrics`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tessera import db
from tessera.service.resources import Resources

log = logging.getLogger(__name__)

WORKER_PING_TIMEOUT_S = 1.0


def _check_database(resources: Resources) -> None:
    db.ping(resources.engine)


def _check_redis(resources: Resources) -> None:
    resources.redis.ping()


def _check_s3(resources: Resources) -> None:
    resources.store.ensure_bucket()


def _check_worker(resources: Resources) -> None:
    replies = resources.celery.control.ping(timeout=WORKER_PING_TIMEOUT_S)
    if not replies:
        raise RuntimeError(f"no Celery worker answered a ping within {WORKER_PING_TIMEOUT_S}s")


READINESS_CHECKS: dict[str, Callable[[Resources], None]] = {
    "database": _check_database,
    "redis": _check_redis,
    "s3": _check_s3,
    "worker": _check_worker,
}


def health_router(checks: tuple[str, ...]) -> APIRouter:
    """Probe endpoints; `/readyz` runs the named checks from READINESS_CHECKS."""
    unknown = set(checks) - set(READINESS_CHECKS)
    if unknown:
        raise ValueError(f"unknown readiness checks: {sorted(unknown)}")
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="The process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        summary="Every dependency answers",
        responses={503: {"description": "a dependency does not answer"}},
    )
    def readyz(request: Request) -> JSONResponse:
        resources: Resources = request.app.state.resources
        results: dict[str, str] = {}
        for name in checks:
            try:
                READINESS_CHECKS[name](resources)
                results[name] = "ok"
            except Exception as error:
                results[name] = f"{type(error).__name__}: {error}"[:300]
        ready = all(value == "ok" for value in results.values())
        if not ready:
            log.warning("not ready", extra={"checks": results})
        return JSONResponse(
            {"status": "ready" if ready else "unready", "checks": results},
            status_code=200 if ready else 503,
        )

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router
