"""Health, readiness, metrics and docs on every service; building an app connects to nothing."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.aggregator.main import create_app as create_aggregator
from services.clustering.main import create_app as create_clustering
from services.inference.api.main import create_app as create_inference
from tessera import procs
from tessera.config import Settings
from tessera.events import AGGREGATION_QUEUE, INFERENCE_QUEUE
from tessera.queue import make_celery
from tessera.service.health import WORKER_PING_TIMEOUT_S
from tessera.stack import worker_command
from tests.helpers import on_redis_db

WRONG_WORKER_DB = 3

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
    assert set(checks) == {"database", "redis", "s3", "worker"}
    assert all(value != "ok" for value in checks.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "own_queue", "other_queue"),
    [
        ("aggregator", AGGREGATION_QUEUE, INFERENCE_QUEUE),
        ("inference", INFERENCE_QUEUE, AGGREGATION_QUEUE),
    ],
)
def test_a_service_is_ready_only_while_a_worker_of_its_own_queue_answers(
    settings: Settings, tmp_path: Path, name: str, own_queue: str, other_queue: str
) -> None:
    # A Redis database of the test's own: the session's worker is not on it.
    own = on_redis_db(settings, WRONG_WORKER_DB)
    node = f"queues-{uuid.uuid4().hex[:8]}"
    process = procs.spawn(
        worker_command(queues=[other_queue], concurrency=1, name=node),
        log_path=tmp_path / "worker.log",
        env={**os.environ, **own.as_env()},
    )
    celery = make_celery(own)
    try:
        procs.wait_until(
            lambda: bool(celery.control.ping(timeout=0.5)),
            timeout=180,  # a worker's start on a busy shared machine
            what=f"the {other_queue}-queue worker",
            process=process,
            log_path=tmp_path / "worker.log",
        )
        destination = [f"{node}@{socket.gethostname()}"]

        def consumes(expected: bool) -> None:
            # A worker answers add_consumer / cancel_consumer at once and changes its queues
            # soon after (call_soon): wait until it has.
            procs.wait_until(
                lambda: expected == (own_queue in _queues(celery, destination)),
                timeout=30,
                what=f"the worker {'consuming' if expected else 'leaving'} {own_queue}",
            )

        with TestClient(FACTORIES[name](own)) as client:
            other_only = client.get("/readyz")
            celery.control.add_consumer(own_queue, destination=destination, reply=True)
            consumes(True)
            joined = client.get("/readyz")  # asks every worker, finds this one
            started = time.perf_counter()
            again = client.get("/readyz")  # asks only the worker found
            again_s = time.perf_counter() - started
            celery.control.cancel_consumer(own_queue, destination=destination, reply=True)
            consumes(False)
            left = client.get("/readyz")
    finally:
        celery.close()
        procs.stop(process)

    assert other_only.status_code == 503
    checks = other_only.json()["checks"]
    assert checks["worker"].startswith(f"RuntimeError: no Celery worker of queue {own_queue}")
    assert {checks[check] for check in ("database", "redis", "s3")} == {"ok"}
    assert joined.status_code == 200 and again.status_code == 200
    assert again_s < WORKER_PING_TIMEOUT_S, again_s  # it did not wait for silence
    assert left.status_code == 503
    assert left.json()["checks"]["worker"].startswith("RuntimeError: no Celery worker")


def _queues(celery: Celery, destination: list[str]) -> set[str]:
    """The queues the workers of `destination` consume now."""
    replies = celery.control.inspect(destination=destination, timeout=1).active_queues() or {}
    return {queue["name"] for consumed in replies.values() for queue in consumed or []}
