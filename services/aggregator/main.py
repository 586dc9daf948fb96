"""Aggregator app: wiring only. Run with `uvicorn --factory services.aggregator.main:create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from services.aggregator.routes import clients
from tessera.config import Settings
from tessera.service.app import create_service_app, ensure_bucket


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_service_app(
        service="aggregator",
        description="Enrolment, encoded task vectors, federated rounds, LoRA updates, adapters.",
        routers=[clients.router],
        checks=("database", "redis", "s3", "worker"),
        settings=settings,
        on_startup=[ensure_bucket],
    )
