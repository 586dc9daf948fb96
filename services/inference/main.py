"""Inference app: wiring only. Run with `uvicorn --factory services.inference.main:create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from tessera.config import Settings
from tessera.service.app import create_service_app, ensure_bucket


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_service_app(
        service="inference",
        description="Generation with one base model and many hot-swapped LoRA adapters.",
        routers=[],
        checks=("database", "redis", "s3"),
        settings=settings,
        on_startup=[ensure_bucket],
    )
