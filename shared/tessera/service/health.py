"""`/healthz` (the process is alive), `/readyz` (its dependencies answer) and `/metrics`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

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


def check_workers(resources: Resources, queues: Sequence[str]) -> None:
    """Some Celery worker consumes each of `queues` (a worker of another queue does not count)."""
    replies = resources.celery.control.inspect(timeout=WORKER_PING_TIMEOUT_S).active_queues()
    served = {queue["name"] for consumed in (replies or {}).values() for queue in consumed}
    missing = [queue for queue in queues if queue not in served]
    if missing:
        raise RuntimeError(
            f"no Celery worker of queue {', '.join(missing)} answered within "
            f"{WORKER_PING_TIMEOUT_S}s"
        )


READINESS_CHECKS: dict[str, Callable[[Resources], None]] = {
    "database": _check_database,
    "redis": _check_redis,
    "s3": _check_s3,
}
WORKER_CHECK = "worker"


def health_router(checks: tuple[str, ...], worker_queues: Sequence[str] = ()) -> APIRouter:
    """Probe endpoints; `/readyz` runs the named checks from READINESS_CHECKS, and "worker":
    a worker of each of `worker_queues` answers."""
    unknown = set(checks) - set(READINESS_CHECKS) - {WORKER_CHECK}
    if unknown:
        raise ValueError(f"unknown readiness checks: {sorted(unknown)}")
    if (WORKER_CHECK in checks) != bool(worker_queues):
        raise ValueError("the worker check needs the queues it checks, and only it does")
    run: dict[str, Callable[[Resources], None]] = {
        **READINESS_CHECKS,
        WORKER_CHECK: lambda resources: check_workers(resources, worker_queues),
    }
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
                run[name](resources)
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
