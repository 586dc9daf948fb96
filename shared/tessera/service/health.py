"""`/healthz` (the process is alive), `/readyz` (its dependencies answer) and `/metrics`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tessera import db
from tessera.service.resources import Resources

log = logging.getLogger(__name__)

# A broadcast to every worker waits this long after the last reply (kombu collects replies
# until a silence this long); a question to the workers seen last time returns at their reply.
WORKER_PING_TIMEOUT_S = 1.0


def _check_database(resources: Resources) -> None:
    db.ping(resources.engine)


def _check_redis(resources: Resources) -> None:
    resources.redis.ping()


def _check_s3(resources: Resources) -> None:
    resources.store.ensure_bucket()


class WorkerCheck:
    """Some Celery worker consumes each of `queues` (a worker of another queue does not count).

    It first asks only the workers that served the queues at the last check (one round trip,
    milliseconds); it broadcasts to every worker (about WORKER_PING_TIMEOUT_S) only when one of
    them no longer answers, or no longer consumes its queue, and on the first check.
    """

    def __init__(self, queues: Sequence[str]) -> None:
        if not queues:
            raise ValueError("a worker check needs the queues it checks")
        self.queues = tuple(queues)
        self._nodes: dict[str, str] = {}  # queue -> a worker that consumed it at the last check

    def __call__(self, resources: Resources) -> None:
        known = sorted(set(self._nodes.values()))
        if known and not self._missing(self._ask(resources, known)):
            return
        missing = self._missing(self._ask(resources, None))
        if missing:
            raise RuntimeError(
                f"no Celery worker of queue {', '.join(missing)} answered within "
                f"{WORKER_PING_TIMEOUT_S}s"
            )

    def _ask(self, resources: Resources, nodes: list[str] | None) -> dict[str, Any]:
        """Each answering worker's consumed queues: of `nodes` (stops at their last reply),
        or of every worker (None)."""
        inspect = resources.celery.control.inspect(
            destination=nodes,
            timeout=WORKER_PING_TIMEOUT_S,
            limit=None if nodes is None else len(nodes),
        )
        return inspect.active_queues() or {}

    def _missing(self, replies: dict[str, Any]) -> list[str]:
        """The queues no reply consumes; remembers a worker of each of the others."""
        served: dict[str, str] = {}
        for node, consumed in sorted(replies.items()):
            for queue in consumed or []:
                served.setdefault(queue["name"], node)
        self._nodes = {queue: served[queue] for queue in self.queues if queue in served}
        return [queue for queue in self.queues if queue not in served]


READINESS_CHECKS: dict[str, Callable[[Resources], None]] = {
    "database": _check_database,
    "redis": _check_redis,
    "s3": _check_s3,
}
WORKER_CHECK = "worker"


class Readiness:
    """A service's readiness checks: the named ones of READINESS_CHECKS, and "worker" (a worker
    of each of `worker_queues` answers). `/readyz` runs it; so does the operator console."""

    def __init__(self, checks: tuple[str, ...], worker_queues: Sequence[str] = ()) -> None:
        unknown = set(checks) - set(READINESS_CHECKS) - {WORKER_CHECK}
        if unknown:
            raise ValueError(f"unknown readiness checks: {sorted(unknown)}")
        if (WORKER_CHECK in checks) != bool(worker_queues):
            raise ValueError("the worker check needs the queues it checks, and only it does")
        self.checks = checks
        self._run: dict[str, Callable[[Resources], None]] = dict(READINESS_CHECKS)
        if worker_queues:
            self._run[WORKER_CHECK] = WorkerCheck(worker_queues)

    def __call__(self, resources: Resources) -> dict[str, str]:
        """Each check's result: "ok", or the error's type and message."""
        results: dict[str, str] = {}
        for name in self.checks:
            if name == WORKER_CHECK and results.get("redis", "ok") != "ok":
                # Workers answer through Redis: asking them would only wait for its timeouts.
                results[name] = "not checked: Redis does not answer"
                continue
            try:
                self._run[name](resources)
                results[name] = "ok"
            except Exception as error:
                results[name] = f"{type(error).__name__}: {error}"[:300]
        return results


def health_router(readiness: Readiness) -> APIRouter:
    """Probe endpoints; `/readyz` runs `readiness`."""
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
        results = readiness(request.app.state.resources)
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
