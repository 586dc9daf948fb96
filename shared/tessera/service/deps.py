"""FastAPI dependencies, as `Annotated` aliases so handlers read like their signature."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import httpx
import redis
from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from tessera.config import Settings
from tessera.service.resources import Resources
from tessera.storage import ObjectStore


def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


def get_settings_dep(resources: ResourcesDep) -> Settings:
    return resources.settings


def get_session(resources: ResourcesDep) -> Iterator[Session]:
    """A session per request; the handler commits what it means to keep."""
    session = resources.sessions()
    try:
        yield session
    finally:
        session.close()


def get_store(resources: ResourcesDep) -> ObjectStore:
    return resources.store


def get_redis(resources: ResourcesDep) -> redis.Redis:
    return resources.redis


def get_celery(resources: ResourcesDep) -> Celery:
    return resources.celery


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


# The clustering service, as the aggregator and the inference service call it.
CLUSTERING_TIMEOUT_S = 10.0


def make_clustering_http(settings: Settings) -> httpx.Client:
    """The client for the clustering service (each request carries its scoped service token)."""
    return httpx.Client(base_url=settings.clustering_url, timeout=CLUSTERING_TIMEOUT_S)


def get_clustering_http(request: Request) -> httpx.Client:
    client: httpx.Client = request.app.state.clustering_http
    return client


ClusteringHttpDep = Annotated[httpx.Client, Depends(get_clustering_http)]
