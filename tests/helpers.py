"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fastapi.testclient import TestClient

from tessera.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `tessera ARGS` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO_ROOT,
    )


def stack_env(data_dir: Path) -> dict[str, str]:
    """Embedded backends (no URLs) and free ports, in a data dir of the test's own."""
    from tessera import procs

    ports = procs.free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update(
        TESSERA_DATA_DIR=str(data_dir),
        TESSERA_AGGREGATOR_URL=f"http://127.0.0.1:{ports[0]}",
        TESSERA_CLUSTERING_URL=f"http://127.0.0.1:{ports[1]}",
        TESSERA_INFERENCE_URL=f"http://127.0.0.1:{ports[2]}",
        TESSERA_LOG_FORMAT="text",
    )
    return env


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def enrol(client: TestClient, operator_token: str, name: str, role: str = "device") -> dict:
    """Enrol a client through the API; return the response body (with its token)."""
    response = client.post(
        "/v1/clients", json={"name": name, "role": role}, headers=bearer(operator_token)
    )
    assert response.status_code == 201, response.text
    return response.json()


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text as {sample name: value}, summed over label sets (e.g. over processes)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def on_redis_db(settings: Settings, number: int) -> Settings:
    """`settings` on Redis database `number`, emptied first: a test package's own queues."""
    import redis

    url = urlunsplit(urlsplit(settings.redis_url or "")._replace(path=f"/{number}"))
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return settings.model_copy(update={"redis_url": url})
