"""DeviceClient's large uploads: through an upload slot straight to the real SeaweedFS, resumed
after an interruption with only the missing parts sent again."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from services.aggregator.main import create_app
from tessera.config import Settings
from tessera.lora import LoraAdapter, adapter_to_bytes, random_adapter
from tessera.model.base import BaseModel
from tessera.sdk.device import DeviceClient
from tessera.sdk.http import ApiError, RetryPolicy
from tessera.storage import ObjectStore

NO_WAIT = RetryPolicy(attempts=2, sleep=lambda _: None)
PART_BYTES = 5 * 1024 * 1024


@pytest.fixture
def aggregator(settings: Settings) -> Iterator[TestClient]:
    settings = settings.model_copy(update={"upload_part_bytes": PART_BYTES})
    with TestClient(create_app(settings)) as client:
        yield client


class PartLink:
    """The device's real link to the object store, counting part PUTs; after `cut_after`
    of them it drops every further one (connection reset), as a link that went down."""

    def __init__(self, cut_after: int | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.cut_after = cut_after
        self.sent: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            if self.cut_after is not None and len(self.sent) >= self.cut_after:
                raise httpx.ConnectError("connection reset by peer")
            self.sent.append(int(request.url.params["partNumber"]))
        return self.inner.handle_request(request)


def device_on(
    aggregator: TestClient, base: BaseModel, state: Path, link: PartLink, **kwargs: Any
) -> DeviceClient:
    device = DeviceClient.load(
        state, base=base, http=aggregator, policy=NO_WAIT, direct_upload_max_bytes=1024, **kwargs
    )
    device.downloads = httpx.Client(transport=link, timeout=30)  # type: ignore[arg-type]
    return device


def large_adapter(base: BaseModel) -> LoraAdapter:
    """Rank 64: its fp16 file (4.5 MB) fits in one part, so it is sent as fp32 (two parts)."""
    return random_adapter(base.lora_spec, 64, 64.0, seed=5)


def test_a_large_update_goes_through_a_slot_and_resumes_after_an_interruption(
    aggregator: TestClient,
    settings: Settings,
    base_model: BaseModel,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    operator = {"Authorization": f"Bearer {settings.operator_token.get_secret_value()}"}
    DeviceClient.enrol(
        aggregator_url=str(aggregator.base_url),
        operator_token=settings.operator_token.get_secret_value(),
        name="edge-large",
        state_dir=tmp_path,
        base=base_model,
        http=aggregator,
    )
    round_ = aggregator.post("/v1/rounds", json={"min_updates": 2}, headers=operator).json()
    adapter = large_adapter(base_model)
    data = adapter_to_bytes(adapter, dtype="float32")
    cut = PartLink(cut_after=1)

    with pytest.raises(ApiError) as interrupted:
        device_on(aggregator, base_model, tmp_path, cut).upload_update(
            round_["id"], adapter, num_samples=8, dtype="float32"
        )
    saved = list((tmp_path / "uploads").iterdir())
    link = PartLink()
    receipt = device_on(aggregator, base_model, tmp_path, link).upload_update(
        round_["id"], adapter, num_samples=8, dtype="float32"
    )

    assert interrupted.value.status == 0  # the link, not the server
    assert cut.sent == [1] and len(saved) == 1  # one part held, the slot kept on disk
    assert link.sent == [2]  # only the part the store did not hold
    assert receipt["sha256"] == hashlib.sha256(data).hexdigest()
    assert receipt["size_bytes"] == len(data) and receipt["replaced"] is False
    assert not (tmp_path / "uploads").exists() or not list((tmp_path / "uploads").iterdir())
    round_now = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()
    assert round_now["updates"] == 1
    prefix = f"updates/round-{round_['id']}/client-{receipt['client_id']}/"
    (key,) = store.list_keys(prefix)
    assert store.get_bytes(key) == data


def test_a_small_update_is_still_put_to_the_aggregator(
    aggregator: TestClient, settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    operator = {"Authorization": f"Bearer {settings.operator_token.get_secret_value()}"}
    DeviceClient.enrol(
        aggregator_url=str(aggregator.base_url),
        operator_token=settings.operator_token.get_secret_value(),
        name="edge-small",
        state_dir=tmp_path,
        base=base_model,
        http=aggregator,
    )
    round_ = aggregator.post("/v1/rounds", json={"min_updates": 2}, headers=operator).json()
    link = PartLink()
    device = DeviceClient.load(tmp_path, base=base_model, http=aggregator, policy=NO_WAIT)
    device.downloads = httpx.Client(transport=link)  # type: ignore[arg-type]
    device.direct_upload_max_bytes = 10 * 1024 * 1024

    receipt = device.upload_update(
        round_["id"], random_adapter(base_model.lora_spec, 4, 4.0, seed=1), num_samples=4
    )

    assert receipt["replaced"] is False and link.sent == []  # nothing went to the store directly
