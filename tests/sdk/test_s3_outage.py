"""The object store killed during uploads: 503 with Retry-After, and the SDK waits and succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.aggregator.main import create_app
from tessera.config import Settings
from tessera.devstack import EmbeddedSeaweed
from tessera.lora import adapter_to_bytes, random_adapter
from tessera.model.base import BaseModel
from tessera.sdk.device import DeviceClient
from tessera.sdk.http import RetryPolicy
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.helpers import bearer

pytestmark = pytest.mark.slow


def test_uploads_while_s3_is_down_get_503_and_the_sdk_retries_after_it(
    settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    seaweed = EmbeddedSeaweed(
        tmp_path / "seaweedfs",
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        bucket=settings.s3_bucket,
    )
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
