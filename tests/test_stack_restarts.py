"""`tessera up`'s supervisor: its restart limit counts crashes within a time window, not over
the stack's life, and it brings back a killed embedded Valkey or SeaweedFS (same port) so that
requests succeed again."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator.main import create_app as create_aggregator
from services.inference.api.main import create_app as create_inference
from tessera import procs
from tessera.config import Settings
from tessera.devstack import EmbeddedSeaweed, EmbeddedValkey, embedded_settings
from tessera.lora import adapter_to_bytes, random_adapter
from tessera.model.base import BaseModel
from tessera.models import Role
from tessera.stack import RestartBudget, Stack
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.helpers import bearer, enrol
from tests.services.inference.helpers import embeds_b64, make_client, tokens


def test_crashes_far_apart_are_always_restarted() -> None:
    budget = RestartBudget(limit=5, window_s=600)

    allowed = [budget.take(now=hour * 3600.0) for hour in range(20)]

    assert all(allowed)


def test_a_crash_loop_is_left_down_for_good() -> None:
    budget = RestartBudget(limit=5, window_s=600)

    allowed = [budget.take(now=10.0 * n) for n in range(6)]
    later = budget.take(now=10_000.0)

    assert allowed == [True] * 5 + [False]
    assert later is False


@contextmanager
def supervised(tmp_path: Path, server: EmbeddedValkey | EmbeddedSeaweed) -> Iterator[Stack]:
    """A stack's supervisor (`tessera up`'s loop) in a thread, watching `server` as its
    embedded Valkey or SeaweedFS."""
    stack = Stack(embedded_settings(tmp_path / "stack"))
    if isinstance(server, EmbeddedValkey):
        stack.devstack.valkey = server
    else:
        stack.devstack.seaweed = server
    supervisor = threading.Thread(target=stack.supervise, daemon=True)
    supervisor.start()
    try:
        yield stack
    finally:
        stack.stop()
        supervisor.join(timeout=10)
    assert not supervisor.is_alive()


def _kill(server: EmbeddedValkey | EmbeddedSeaweed) -> subprocess.Popen[bytes]:
    """SIGKILL the server, as a crash; the killed process."""
    killed = server.process
    assert killed is not None
    killed.kill()
    killed.wait(10)
    return killed


def test_the_supervisor_restarts_a_killed_valkey_and_generations_are_queued_again(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    valkey = EmbeddedValkey(tmp_path / "valkey", persistent=True)
    url = valkey.start()
    own = settings.model_copy(update={"redis_url": url})
    _, token = make_client(session, own, Role.GENERATOR)
    body = {"prompt_embeds": embeds_b64(tokens()), "adapters": [], "steps": 2, "seed": 1}

    def generation() -> int:
        return api.post("/v1/generations", json=body, headers=bearer(token)).status_code

    with supervised(tmp_path, valkey), TestClient(create_inference(own)) as api:
        before = generation()
        killed = _kill(valkey)
        started = time.monotonic()
        procs.wait_until(lambda: generation() == 202, timeout=60, what="a generation queued")
        recovered_s = time.monotonic() - started

    print(f"Valkey killed: restarted, and a generation queued again {recovered_s:.1f} s after")
    assert before == 202
    assert valkey.process is not killed
    assert valkey.url == url  # the same port: clients reconnect where they were


@pytest.mark.slow
def test_the_supervisor_restarts_a_killed_seaweedfs_and_uploads_succeed_again(
    settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    seaweed = EmbeddedSeaweed(
        tmp_path / "seaweedfs",
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        bucket=settings.s3_bucket,
    )
    endpoint = seaweed.start()
    own = settings.model_copy(update={"s3_endpoint": endpoint})
    operator = own.operator_token.get_secret_value()
    update = adapter_to_bytes(random_adapter(base_model.lora_spec, 4, 4.0, seed=1))
    with supervised(tmp_path, seaweed), TestClient(create_aggregator(own)) as aggregator:
        round_id = aggregator.post(
            "/v1/rounds", json={"min_updates": 5}, headers=bearer(operator)
        ).json()["id"]
        device = enrol(aggregator, operator, "edge-seaweed-restart")

        def upload() -> int:
            return aggregator.put(
                f"/v1/rounds/{round_id}/updates/{device['id']}",
                content=update,
                params={"num_samples": 3},
                headers={**bearer(device["token"]), "Content-Type": "application/octet-stream"},
            ).status_code

        before = upload()
        killed = _kill(seaweed)
        started = time.monotonic()
        down = upload()
        procs.wait_until(lambda: upload() == 200, timeout=120, what="an upload", interval=1)
        recovered_s = time.monotonic() - started

    print(f"SeaweedFS killed: restarted, and an upload stored again {recovered_s:.1f} s after")
    assert before == 201
    assert down == 503
    assert seaweed.process is not killed
    assert seaweed.endpoint == endpoint  # the same S3 port
