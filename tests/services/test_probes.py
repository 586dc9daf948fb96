"""Health, readiness, metrics and docs on every service; building an app connects to nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.aggregator.main import create_app as create_aggregator
from services.clustering.main import create_app as create_clustering
from services.inference.api.main import create_app as create_inference
from tessera.config import Settings

FACTORIES = {
    "aggregator": create_aggregator,
    "clustering": create_clustering,
    "inference": create_inference,
}


@pytest.fixture(params=sorted(FACTORIES))
def service(request: pytest.FixtureRequest, settings: Settings) -> Iterator[TestClient]:
    with TestClient(FACTORIES[request.param](settings)) as client:
        yield client


@pytest.mark.usefixtures("worker")
def test_every_service_is_alive_ready_and_documented(service: TestClient) -> None:
    health = service.get("/healthz")
    ready = service.get("/readyz")
    docs = service.get("/docs")
    spec = service.get("/openapi.json")

    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200, ready.json()
    assert set(ready.json()["checks"].values()) == {"ok"}
    assert docs.status_code == 200
    assert "/healthz" in spec.json()["paths"]


def test_metrics_count_requests_by_route(service: TestClient) -> None:
    service.get("/healthz")

    metrics = service.get("/metrics").text

    assert "tessera_http_requests_total{" in metrics
    assert 'route="/healthz"' in metrics


def test_building_apps_connects_to_nothing() -> None:
    unreachable = Settings(
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
        redis_url="redis://127.0.0.1:1/0",
        s3_endpoint="127.0.0.1:1",
    )

    apps: list[FastAPI] = [factory(unreachable) for factory in FACTORIES.values()]

    assert [app.state.service for app in apps] == list(FACTORIES)


def test_readyz_names_what_is_down() -> None:
    unreachable = Settings(
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
        redis_url="redis://127.0.0.1:1/0",
        s3_endpoint="127.0.0.1:1",
    )
    with TestClient(create_inference(unreachable)) as client:
        response = client.get("/readyz")

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert set(checks) == {"database", "redis", "s3"}
    assert all(value != "ok" for value in checks.values())
