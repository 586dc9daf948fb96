"""Fixtures of the inference tests: a Redis database of their own, the API, clients, adapters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.inference.api.main import create_app
from services.inference.worker.cache import AdapterCache
from services.inference.worker.runner import JobRuntime
from services.worker.publishing import PublishedVersion
from tessera import db
from tessera.config import Settings
from tessera.lora import LoraSpec, random_adapter
from tessera.model.base import BaseModel
from tessera.models import Role
from tessera.storage import ObjectStore
from tests.helpers import on_redis_db
from tests.services.inference.helpers import make_client, publish

MiB = 1024 * 1024

# Messages and events go to a Redis database of their own: nothing else consumes the
# inference queue there, so a test reads exactly what it queued.
QUEUE_DB = 2


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on shared cores, two threads make a small UNet 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return on_redis_db(settings, QUEUE_DB)


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url or "")
    yield client
    client.close()


@pytest.fixture
def store(store: ObjectStore) -> ObjectStore:
    """The session's store without earlier tests' job inputs and outputs."""
    for prefix in ("inputs/", "generations/"):
        for key in store.list_keys(prefix):
            store.delete(key)
    return store


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = db.create_db_engine(settings.resolved_database_url)
    yield db.session_factory(engine)
    engine.dispose()


@pytest.fixture
def api(settings: Settings, store: ObjectStore) -> Iterator[TestClient]:
    """The inference app in-process, on the session's real database, Redis and S3."""
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def generator(session: Session, settings: Settings) -> tuple[int, str]:
    """An enrolled generation client: (id, token)."""
    return make_client(session, settings, Role.GENERATOR)


@pytest.fixture(scope="module")
def spec(base_model: BaseModel) -> LoraSpec:
    return base_model.lora_spec


@pytest.fixture
def runtime(
    base_model: BaseModel,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    broker: redis.Redis,
) -> JobRuntime:
    cache = AdapterCache(base=base_model, sessions=sessions, store=store, max_bytes=64 * MiB)
    # One job per run (TESSERA_INFERENCE_MAX_BATCH_IMAGES=1); test_batches.py raises it.
    return JobRuntime(sessions=sessions, store=store, redis=broker, base=base_model, cache=cache)


@pytest.fixture
def styles(
    sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> dict[str, PublishedVersion]:
    """Two strong random cluster adapters: each visibly changes the images."""
    return {
        name: publish(sessions, store, name, random_adapter(spec, 4, 4.0, seed=seed, std=0.25))
        for seed, name in ((11, "cluster:0"), (12, "cluster:1"))
    }
