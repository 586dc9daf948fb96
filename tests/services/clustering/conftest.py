from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from services.clustering.main import create_app
from tessera.config import Settings


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Settings:
    """The clustering service touches only the database: no Redis or S3 server to start here."""
    return Settings(
        env="test",
        data_dir=tmp_path_factory.mktemp("clustering-data"),
        database_url=database_url,
        log_format="text",
    )


@pytest.fixture
def clustering_api(settings: Settings) -> Iterator[TestClient]:
    """The clustering app in-process, on the session's real database."""
    with TestClient(create_app(settings)) as client:
        yield client
