"""Clustering app: wiring only. Run with `uvicorn --factory services.clustering.main:create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from services.clustering.routes import assignments, clusterings, jobs, routing
from tessera.config import Settings
from tessera.service.app import create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_service_app(
        service="clustering",
        description="Clusters devices by their encoded task vectors; routes prompts to clusters.",
        routers=[clusterings.router, jobs.router, assignments.router, routing.router],
        checks=("database", "redis"),  # redis: re-clustering jobs are sent through it
        settings=settings,
    )
