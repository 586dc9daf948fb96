"""Aggregator app: wiring only. Run with `uvicorn --factory services.aggregator.main:create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from services.aggregator.lifespan import extend_lifespan
from services.aggregator.routes import adapters, clients, devices, rounds, secagg, slots, updates
from services.aggregator.uploads import UPLOAD_PREFIX, CountOversizedUploads, upload_limit
from services.console.app import mount_console
from tessera.config import Settings, get_settings
from tessera.events import AGGREGATION_QUEUE
from tessera.service.app import create_service_app, ensure_bucket
from tessera.service.deps import make_clustering_http


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = resolved = settings or get_settings()
    app = create_service_app(
        service="aggregator",
        description="Enrolment, encoded task vectors, federated rounds, LoRA updates, adapters.",
        routers=[
            clients.router,
            devices.router,
            rounds.router,
            updates.router,
            secagg.router,
            slots.router,
            adapters.router,
        ],
        checks=("database", "redis", "s3", "worker"),
        settings=settings,
        upload_limits={UPLOAD_PREFIX: lambda: upload_limit(resolved)},
        worker_queues=[AGGREGATION_QUEUE],  # only a worker of its own queue makes it ready
        on_startup=[ensure_bucket],
    )
    mount_console(app)  # the operator console's pages under /console
    app.add_middleware(CountOversizedUploads)  # outermost: sees the body-size middleware's 413s
    app.state.clustering_http = make_clustering_http(settings)
    extend_lifespan(app)  # the deadline loop
    return app
