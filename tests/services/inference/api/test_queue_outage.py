"""A Redis outage is answered at once: 503 with Retry-After, nothing kept, no internal text."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.inference.api.main import create_app
from tessera.config import Settings
from tessera.devstack import EmbeddedValkey
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.inference.helpers import embeds_b64, job_rows, tokens

# A wall-clock bound: under pytest-xdist these modules run one at a time, on one worker.
pytestmark = pytest.mark.xdist_group("timed")


def test_a_generation_during_a_redis_outage_is_a_quick_503(
    settings: Settings,
    generator: tuple[int, str],
    session: Session,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    # A Redis of the test's own, stopped once the app has used it.
    valkey = EmbeddedValkey(tmp_path / "valkey", persistent=False)
    app = create_app(settings.model_copy(update={"redis_url": valkey.start()}))
    body = {"prompt_embeds": embeds_b64(tokens()), "adapters": [], "steps": 2, "seed": 1}
    try:
        with TestClient(app) as api:
            valkey.stop()
            started = time.monotonic()
            response = api.post("/v1/generations", json=body, headers=bearer(generator[1]))
            took = time.monotonic() - started
    finally:
        valkey.stop()

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json() == {"detail": "the job queue is unavailable; retry"}
    assert took < 3, f"took {took:.1f} s"
    assert job_rows(session) == 0
    assert store.list_keys("inputs/") == []
