"""The object store killed during uploads: 503 with Retry-After, and the SDK waits and succeeds.
Killed between two uploads, and in the middle of one (its body half sent to the store, through
a proxy that slows it down): nothing is stored half, and no object is left that no row names."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from tessera.config import Settings
from tessera.devstack import EmbeddedSeaweed
from tessera.lora import adapter_to_bytes, random_adapter
from tessera.model.base import BaseModel
from tessera.models import Update
from tessera.sdk.device import DeviceClient
from tessera.sdk.http import RetryPolicy
from tessera.storage import ObjectStore
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.helpers import bearer
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

# What reaches the object store per second: an update's body (rank 8, fp16, as the SDK sends
# it: 579 kB) takes about half a second to arrive (the API's store client sends a body within
# its 2 s connect timeout), and the store is killed once a tenth of it has.
S3_BYTES_PER_S = 1024 * 1024
KILL_AFTER_BYTES = 64 * 1024
S3_DOWN_S = 2.0


def _seaweed(settings: Settings, tmp_path: Path) -> EmbeddedSeaweed:
    return EmbeddedSeaweed(
        tmp_path / "seaweedfs",
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        bucket=settings.s3_bucket,
    )


def test_uploads_while_s3_is_down_get_503_and_the_sdk_retries_after_it(
    settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    seaweed = _seaweed(settings, tmp_path)
    own = settings.model_copy(update={"s3_endpoint": seaweed.start()})
    waits: list[float] = []

    def wait_and_bring_s3_back(seconds: float) -> None:
        waits.append(seconds)
        if seaweed.process is None:
            seaweed.start()  # same data dir, same S3 port

    try:
        with TestClient(create_app(own)) as aggregator:
            operator = bearer(own.operator_token.get_secret_value())
            round_id = aggregator.post("/v1/rounds", json={"min_updates": 5}, headers=operator)
            device = DeviceClient.enrol(
                aggregator_url=str(aggregator.base_url),
                operator_token=own.operator_token.get_secret_value(),
                name="edge-s3-outage",
                http=aggregator,
                policy=RetryPolicy(attempts=3, sleep=wait_and_bring_s3_back),
            )
            adapter = random_adapter(base_model.lora_spec, 4, 4.0, seed=1)
            assert seaweed.process is not None
            seaweed.process.kill()  # SIGKILL, as a crash
            seaweed.process.wait()
            seaweed.process = None
            refused = aggregator.put(
                f"/v1/rounds/{round_id.json()['id']}/updates/{device.client_id}",
                content=adapter_to_bytes(adapter),
                params={"num_samples": 3},
                headers={**bearer(device.token), "Content-Type": "application/octet-stream"},
            )
            receipt = device.upload_update(round_id.json()["id"], adapter, num_samples=3)
    finally:
        seaweed.stop()

    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "5"
    assert refused.json() == {"detail": "the object store is unavailable; retry after 5 s"}
    assert waits == [5.0]  # the SDK waited what the server asked, once, then succeeded
    assert receipt["size_bytes"] > 0 and receipt["replaced"] is False


def test_s3_killed_mid_body_is_a_503_the_sdk_retries_after_and_nothing_is_stored_half(
    settings: Settings, session: Session, base_model: BaseModel, tmp_path: Path
) -> None:
    seaweed = _seaweed(settings, tmp_path)
    host, port = seaweed.start().rsplit(":", 1)
    adapter = random_adapter(base_model.lora_spec, 8, 8.0, seed=1)
    body = adapter_to_bytes(adapter, dtype="float16")
    answers: list[httpx.Response] = []
    waits: list[float] = []
    killed_at: list[float] = []

    def kill_mid_body(proxy: TcpProxy, sent_before: int) -> None:
        while proxy.upstream_bytes < sent_before + KILL_AFTER_BYTES:
            time.sleep(0.005)
        assert seaweed.process is not None
        seaweed.process.kill()  # SIGKILL, as a crash, with the body half sent
        killed_at.append(time.monotonic())
        seaweed.process.wait()
        seaweed.process = None

    def wait_and_bring_s3_back(seconds: float) -> None:
        waits.append(seconds)
        started = time.monotonic()
        killer.join(60)
        if seaweed.process is None:
            # From this thread: a server started by a thread that ends gets SIGTERM with it.
            time.sleep(S3_DOWN_S)
            seaweed.start()  # same data dir, same S3 port
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))

    try:
        with TcpProxy((host, int(port)), upstream_bytes_per_s=S3_BYTES_PER_S) as proxy:
            own = settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{proxy.port}"})
            with TestClient(create_app(own)) as aggregator:
                operator = bearer(own.operator_token.get_secret_value())
                round_id = aggregator.post(
                    "/v1/rounds", json={"min_updates": 5}, headers=operator
                ).json()["id"]
                device = DeviceClient.enrol(
                    aggregator_url=str(aggregator.base_url),
                    operator_token=own.operator_token.get_secret_value(),
                    name="edge-s3-killed-mid-body",
                    http=aggregator,
                    policy=RetryPolicy(sleep=wait_and_bring_s3_back),
                )
                aggregator.event_hooks["response"].append(answers.append)
                killer = threading.Thread(target=kill_mid_body, args=(proxy, proxy.upstream_bytes))
                killer.start()
                receipt = device.upload_update(round_id, adapter, num_samples=3)
                done_at = time.monotonic()
        store = ObjectStore.from_settings(
            settings.model_copy(update={"s3_endpoint": seaweed.endpoint})
        )
        stored = {
            key: store.get_bytes(key) for key in store.list_keys(f"updates/round-{round_id}/")
        }
    finally:
        seaweed.stop()
    rows = session.scalars(select(Update).where(Update.round_id == round_id)).all()

    print(
        f"S3 killed mid-body: {len(answers)} answers {[a.status_code for a in answers]}, "
        f"waits {waits}; {len(body)} bytes stored {done_at - killed_at[0]:.1f} s after the kill"
    )
    refused = answers[0]
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "5"
    assert refused.json() == {"detail": "the object store is unavailable; retry after 5 s"}
    assert {a.status_code for a in answers[1:-1]} <= {503}  # the store may still be starting
    assert answers[-1].status_code == 201 and receipt["size_bytes"] == len(body)
    assert waits and set(waits) == {5.0}  # what the server asked, each time
    assert len(rows) == 1 and rows[0].sha256 == hashlib.sha256(body).hexdigest()
    assert stored == {rows[0].object_key: body}  # whole, and nothing else under the round
