from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from services.aggregator.main import create_app
from tessera.config import Settings


@pytest.fixture
def aggregator(settings: Settings) -> Iterator[TestClient]:
    """The aggregator app in-process, on the session's real database, Redis and S3."""
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def operator_token(settings: Settings) -> str:
    return settings.operator_token.get_secret_value()
