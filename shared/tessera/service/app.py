"""The FastAPI app factory every service uses: logging, limits, metrics, errors, probes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import MappingProxyType

from fastapi import APIRouter, FastAPI

from tessera import __version__
from tessera.config import Settings, get_settings
from tessera.logs import configure_logging
from tessera.service.errors import install_error_handlers
from tessera.service.health import Readiness, health_router
from tessera.service.middleware import (
    BodySizeLimitMiddleware,
    InFlightLimitMiddleware,
    MetricsMiddleware,
)
from tessera.service.resources import Resources

log = logging.getLogger(__name__)

StartupHook = Callable[[Resources], None]


def create_service_app(
    *,
    service: str,
    description: str,
    routers: Sequence[APIRouter],
    checks: tuple[str, ...],
    settings: Settings | None = None,
    upload_limits: Mapping[str, Callable[[], int]] = MappingProxyType({}),
    worker_queues: Sequence[str] = (),
    on_startup: Sequence[StartupHook] = (),
) -> FastAPI:
    """A service app; connections open on first use, so building one touches no server.

    `upload_limits` maps a path prefix to its body limit (called on the first request under
    it), in place of TESSERA_MAX_REQUEST_BYTES.
    """
    settings = settings or get_settings()
    configure_logging(settings, service=service)
    resources = Resources(settings, quick=True)  # requests wait on it

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for hook in on_startup:
            try:
                hook(resources)
            except Exception:
                # A dependency that is down at start-up shows in /readyz; the process stays up.
                log.exception("start-up step %s failed", getattr(hook, "__name__", hook))
        log.info("service started", extra={"service": service, "env": settings.env.value})
        yield
        await resources.aclose()

    app = FastAPI(
        title=f"Tessera {service}",
        description=description,
        version=__version__,
        lifespan=lifespan,
    )
    app.state.resources = resources
    app.state.service = service
    app.state.readiness = readiness = Readiness(checks, worker_queues)
    install_error_handlers(app)
    app.include_router(health_router(readiness))
    for router in routers:
        app.include_router(router)
    app.add_middleware(  # inside the metrics: its 503s are counted
        InFlightLimitMiddleware,
        limit=settings.max_requests_in_flight,
        queue_s=settings.request_queue_s,
    )
    app.add_middleware(MetricsMiddleware, service=service)
    app.add_middleware(
        BodySizeLimitMiddleware,
        default_limit=settings.max_request_bytes,
        limits_by_prefix=upload_limits,
        read_timeout_s=settings.body_read_timeout_s,
    )
    return app


def ensure_bucket(resources: Resources) -> None:
    """Start-up hook: create the object-store bucket if it is missing."""
    resources.store.ensure_bucket()
