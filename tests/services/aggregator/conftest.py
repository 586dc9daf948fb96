"""Fixtures of the aggregator's federation API: a Redis database of its own, LoRA files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from services.aggregator.main import create_app
from tessera.config import Settings
from tessera.lora import LoraSpec
from tessera.model.base import BaseModel
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol, on_redis_db

# Messages go to a Redis database of their own, so that a session-wide worker (listening on
# database 0) cannot take the aggregation task before a test reads it off the queue.
QUEUE_DB = 1


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return on_redis_db(settings, QUEUE_DB)


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url or "")
    yield client
    client.close()


@pytest.fixture
def aggregator(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def spec(base_model: BaseModel) -> LoraSpec:
    return base_model.lora_spec


@pytest.fixture
def device(aggregator: TestClient, operator_token: str) -> dict:
    """An enrolled device: its id, name and token."""
    return enrol(aggregator, operator_token, "edge-01")


@pytest.fixture
def other_device(aggregator: TestClient, operator_token: str) -> dict:
    return enrol(aggregator, operator_token, "edge-02")


@pytest.fixture
def operator(operator_token: str) -> dict[str, str]:
    return bearer(operator_token)


@pytest.fixture
def store(store: ObjectStore) -> ObjectStore:
    """The session's store without the updates of earlier tests (round ids start again at 1)."""
    for key in store.list_keys("updates/"):
        store.delete(key)
    return store
