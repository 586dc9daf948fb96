"""`/readyz` turns unready when Redis stops and its Redis check passes again when it returns.

No inference worker serves this test's own Redis, so the worker check keeps the API unready
throughout (tests/services/test_probes.py covers that check): the Redis check is read itself."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from services.inference.api.main import create_app
from tessera.config import Settings
from tessera.devstack import EmbeddedValkey


def test_readyz_follows_redis_down_and_back(settings: Settings, tmp_path: Path) -> None:
    # A Redis of this test's own, so stopping it disturbs nothing else.
    valkey = EmbeddedValkey(tmp_path / "valkey", persistent=False)
    url = valkey.start()
    app = create_app(settings.model_copy(update={"redis_url": url}))
    try:
        with TestClient(app) as client:
            before = client.get("/readyz")
            valkey.stop()
            during = client.get("/readyz")
            valkey.start()  # same port
            after = client.get("/readyz")
    finally:
        valkey.stop()

    assert before.json()["checks"]["redis"] == "ok"
    assert before.json()["checks"]["database"] == "ok"
    assert during.status_code == 503
    assert during.json()["checks"]["redis"].startswith("ConnectionError")
    assert during.json()["checks"]["database"] == "ok"
    assert after.json()["checks"]["redis"] == "ok"
