from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.clustering.main import create_app
from tessera.config import Settings
from tests.helpers import on_redis_db
from tests.services.clustering.helpers import Member, add_device

# Re-clustering jobs are queued on a Redis database of their own, where no session-wide worker
# takes them: a test runs a job itself (`helpers.run_here`) or starts a worker of its own.
QUEUE_DB = 6


@pytest.fixture(scope="session")
def base_settings(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str
) -> Settings:
    """The clustering service touches the database and Redis (to queue re-clusterings): no S3
    server to start here."""
    return Settings(
        env="test",
        data_dir=tmp_path_factory.mktemp("clustering-data"),
        database_url=database_url,
        redis_url=redis_url,
        log_format="text",
    )


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return on_redis_db(settings, QUEUE_DB)


@pytest.fixture
def clustering_api(settings: Settings) -> Iterator[TestClient]:
    """The clustering app in-process, on the session's real database."""
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def fleet(session: Session, settings: Settings) -> list[Member]:
    """Twelve devices, four around each of three task directions, two task vectors each."""
    return [add_device(session, settings, f"edge-{i:02d}", i % 3, seed=100 + i) for i in range(12)]
