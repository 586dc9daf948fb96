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


# pytest-xdist's workers (`make test` runs two) share a configured Redis server: each takes a
# block of databases, 0 for its session and the rest for test packages' own queues.
REDIS_DATABASES_PER_WORKER = 8
REDIS_DATABASES = 16  # the server's default `databases`


def xdist_worker() -> int:
    """This process's pytest-xdist worker number (gw1 -> 1); 0 when pytest runs alone."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def redis_database(number: int) -> int:
    """Redis database `number` (0: the session's) of this pytest process's block."""
    if not 0 <= number < REDIS_DATABASES_PER_WORKER:
        raise ValueError(f"a test's Redis database must be in 0..{REDIS_DATABASES_PER_WORKER - 1}")
    database = xdist_worker() * REDIS_DATABASES_PER_WORKER + number
    if database >= REDIS_DATABASES:
        most = REDIS_DATABASES // REDIS_DATABASES_PER_WORKER
        raise RuntimeError(
            f"xdist worker {xdist_worker()} would need Redis database {database}, past the "
            f"server's {REDIS_DATABASES}: run at most {most} workers on a shared Redis"
        )
    return database


def on_redis_database(url: str, number: int) -> str:
    """`url` on this process's Redis database `number`."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{redis_database(number)}"))


def on_redis_db(settings: Settings, number: int) -> Settings:
    """`settings` on Redis database `number` (1..7 of this process's block), emptied first: a
    test package's own queues."""
    import redis

    if number == 0:
        raise ValueError("Redis database 0 is the session's: a test package takes 1..7")
    url = on_redis_database(settings.redis_url or "", number)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return settings.model_copy(update={"redis_url": url})
