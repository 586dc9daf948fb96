"""Inference app: wiring only. Run with `uvicorn --factory services.inference.api.main:create_app`.

The API checks, stores and queues generation jobs; the model runs in the inference workers
(`celery -A services.inference.worker.app worker --queues inference`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.inference.api.routes import generations
from services.inference.api.stalled import LOOP_NAME, check_stalled_jobs
from tessera.config import Settings, get_settings
from tessera.events import INFERENCE_QUEUE
from tessera.service.app import create_service_app, ensure_bucket
from tessera.service.deps import make_clustering_http
from tessera.service.housekeeping import add_housekeeping


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = create_service_app(
        service="inference",
        description="Generation with one base model and many hot-swapped LoRA adapters.",
        routers=[generations.router],
        checks=("database", "redis", "s3", "worker"),
        settings=settings,
        worker_queues=[INFERENCE_QUEUE],  # only a worker of its own queue makes it ready
        on_startup=[ensure_bucket],
    )
    app.state.clustering_http = make_clustering_http(settings)
    add_housekeeping(app, check_stalled_jobs, name=LOOP_NAME)  # jobs whose worker died
    _close_clustering_http_at_shutdown(app)
    return app


def _close_clustering_http_at_shutdown(app: FastAPI) -> None:
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        clustering_http = app.state.clustering_http  # tests may swap in another later
        async with inner(app) as state:
            try:
                yield state
            finally:
                clustering_http.close()

    app.router.lifespan_context = lifespan
