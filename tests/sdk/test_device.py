"""DeviceClient against the real aggregator and clustering apps (in-process), real S3 and DB."""

from __future__ import annotations

import pickle
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from services.aggregator.main import create_app
from services.clustering.main import create_app as create_clustering_app
from tessera.config import Settings
from tessera.data import style_dataset, to_tensor
from tessera.lora import random_adapter
from tessera.model.base import BaseModel
from tessera.sdk.device import DeviceClient
from tessera.sdk.http import ApiError, RetryPolicy

NO_WAIT = RetryPolicy(attempts=4, sleep=lambda _: None)


@pytest.fixture
def aggregator(settings: Settings) -> Iterator[TestClient]:
    with (
        TestClient(create_app(settings)) as client,
        TestClient(create_clustering_app(settings)) as clustering,
    ):
        client.app.state.clustering_http = clustering  # type: ignore[attr-defined]
        yield client


def enrol(aggregator: httpx.Client, settings: Settings, base: BaseModel, tmp: Path) -> DeviceClient:
    return DeviceClient.enrol(
        aggregator_url=str(aggregator.base_url),
        operator_token=settings.operator_token.get_secret_value(),
        name=f"edge-{tmp.name[-12:]}",
        state_dir=tmp / "device",
        base=base,
        http=aggregator,
        policy=NO_WAIT,
    )


class Flaky:
    """The real app behind a link that drops the first `drops` requests (connection reset)."""

    def __init__(self, inner: Any, drops: int):
        self.inner = inner
        self.drops = drops
        self.seen = 0

    def handle_request(self, request: Any) -> Any:
        self.seen += 1
        if self.seen <= self.drops:
            raise httpx.ConnectError("connection reset by peer")
        return self.inner.handle_request(request)


def flaky(client: TestClient, drops: int) -> Flaky:
    """Put a Flaky link between the (already enrolled) device's client and the app."""
    transport = Flaky(client._transport, drops)
    client._transport = transport  # type: ignore[assignment]
    return transport


def test_enrol_saves_identity_privately_and_load_restores_it(
    aggregator: TestClient, settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    device = enrol(aggregator, settings, base_model, tmp_path)

    state = tmp_path / "device" / "device.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    again = DeviceClient.load(tmp_path / "device", base=base_model, http=aggregator)
    assert (again.client_id, again.token) == (device.client_id, device.token)
    with pytest.raises(FileNotFoundError, match="tessera device enrol"):
        DeviceClient.load(tmp_path / "nowhere")


def test_full_round_from_the_device_side(
    aggregator: TestClient, settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    device = enrol(aggregator, settings, base_model, tmp_path)
    operator = {"Authorization": f"Bearer {settings.operator_token.get_secret_value()}"}

    stored = device.upload_task_descriptions(["bold diagonal stripes", "striped posters"])
    opened = aggregator.post("/v1/rounds", json={"min_updates": 2}, headers=operator).json()
    synced = device.sync()
    data = style_dataset("stripes", 4, 0)
    tokens = device.encode(data.captions)
    result = device.train(to_tensor(data.images), tokens, rank=4, steps=2, batch_size=2)
    receipt = device.upload_update(opened["id"], result.adapter, num_samples=4, train_loss=0.1)
    replaced = device.upload_update(opened["id"], result.adapter, num_samples=4)

    assert stored["stored"] == 2 and stored["assignment"]["cluster"] is not None
    assert synced.current_round is not None and synced.current_round["id"] == opened["id"]
    assert synced.start_adapter is None  # nothing published yet: from scratch
    assert receipt["replaced"] is False and replaced["replaced"] is True
    assert device.traffic.up > receipt["size_bytes"] * 2
    reloaded = DeviceClient.load(tmp_path / "device", base=base_model)
    assert reloaded.personal is not None
    assert reloaded.personal.parameters == result.adapter.parameters


def test_a_refusal_is_not_retried_and_names_the_problem(
    aggregator: TestClient, settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    device = enrol(aggregator, settings, base_model, tmp_path)
    transport = flaky(aggregator, drops=0)  # counts requests

    with pytest.raises(ApiError) as caught:
        device.upload_update(
            999, random_adapter(base_model.lora_spec, 4, 4.0, seed=0), num_samples=1
        )

    assert caught.value.status == 404 and transport.seen == 1
    # The simulator's device pool sends it across processes: it must survive pickling.
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.status, copy.detail, str(copy)) == (404, caught.value.detail, str(caught.value))


def test_an_interrupted_upload_is_resent_and_lands_once(
    aggregator: TestClient, settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    device = enrol(aggregator, settings, base_model, tmp_path)
    operator = {"Authorization": f"Bearer {settings.operator_token.get_secret_value()}"}
    opened = aggregator.post("/v1/rounds", json={"min_updates": 5}, headers=operator).json()
    transport = flaky(aggregator, drops=2)

    receipt = device.upload_update(
        opened["id"], random_adapter(base_model.lora_spec, 4, 4.0, seed=1), num_samples=3
    )

    assert transport.seen == 3 and receipt["replaced"] is False
    progress = aggregator.get(f"/v1/rounds/{opened['id']}", headers=operator).json()
    assert progress["updates"] == 1


def test_gives_up_after_the_policy_s_attempts(
    aggregator: TestClient, settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    device = enrol(aggregator, settings, base_model, tmp_path)
    flaky(aggregator, drops=10)

    with pytest.raises(ApiError, match="unreachable after 4 attempts"):
        device.assignment()


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    delays = [policy.delay(n) for n in range(8)]
    assert 0.25 <= delays[0] <= 0.5 and all(d <= 4.0 for d in delays) and delays[6] >= 2.0


def test_retry_after_is_waited_for_instead_of_the_backoff() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0, max_retry_after_s=30.0)
    in_ten_s = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)

    assert policy.delay(0, "7") == 7.0
    assert policy.delay(0, "3600") == 30.0
    assert 8.0 <= policy.delay(0, in_ten_s) <= 10.0
    assert policy.delay(0, "soon") <= 0.5  # unreadable: the backoff
