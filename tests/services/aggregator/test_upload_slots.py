"""Updates sent straight to the object store (the real SeaweedFS) through upload slots."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.aggregator.slots import open_slot, sign_slot
from tessera.config import Settings
from tessera.lora import LoraAdapter, LoraSpec, adapter_to_bytes
from tessera.models import Update
from tessera.storage import ObjectNotFoundError, ObjectStore
from tests.helpers import bearer
from tests.services.aggregator.helpers import lora, nothing_stored, open_round

PART_BYTES = 5 * 1024 * 1024  # S3's smallest part (but the last)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"upload_part_bytes": PART_BYTES})


def large_adapter(spec: LoraSpec, seed: int = 0) -> LoraAdapter:
    """The bundled model's largest update: rank 64, float32 on the wire (8.9 MB, two parts)."""
    return lora(spec, seed, rank=64)


def update_file(spec: LoraSpec, seed: int = 0) -> bytes:
    data = adapter_to_bytes(large_adapter(spec, seed), dtype="float32")
    assert len(data) > PART_BYTES
    return data


def open_slot_for(aggregator: TestClient, token: str, round_id: int, data: bytes) -> Any:
    body = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    response = aggregator.post(f"/v1/rounds/{round_id}/uploads", json=body, headers=bearer(token))
    assert response.status_code == 201, response.text
    return response.json()


def put_parts(slot: dict, data: bytes, *, only: set[int] | None = None) -> None:
    """PUT the slot's parts (or those in `only`) to their presigned URLs, as a device does."""
    with httpx.Client(timeout=30) as s3:
        for part in slot["parts"]:
            if part["url"] is None or (only is not None and part["number"] not in only):
                continue
            start = (part["number"] - 1) * slot["part_bytes"]
            answer = s3.put(part["url"], content=data[start : start + part["size"]])
            assert answer.status_code == 200, answer.text


def commit(aggregator: TestClient, token: str, round_id: int, slot: str, **body: Any) -> Any:
    return aggregator.post(
        f"/v1/rounds/{round_id}/uploads/{slot}/commit",
        json={"num_samples": 16, **body},
        headers=bearer(token),
    )


def test_a_large_update_goes_through_a_slot_and_counts(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=2)
    data = update_file(spec)

    slot = open_slot_for(aggregator, device["token"], round_["id"], data)
    put_parts(slot, data)
    receipt = commit(aggregator, device["token"], round_["id"], slot["slot"], train_loss=0.5)
    again = commit(aggregator, device["token"], round_["id"], slot["slot"])

    assert slot["missing"] == len(slot["parts"]) == math.ceil(len(data) / PART_BYTES)
    assert receipt.status_code == 201, receipt.text
    assert receipt.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert receipt.json()["size_bytes"] == len(data)
    assert again.status_code == 200 and again.json()["replaced"] is True  # safe to repeat
    row = session.scalars(select(Update).where(Update.round_id == round_["id"])).one()
    assert (row.num_samples, row.train_loss) == (16, None)
    assert store.get_bytes(row.object_key, expected_sha256=row.sha256) == data
    assert store.list_keys(row.object_key.rsplit("/", 1)[0] + "/") == [row.object_key]


def test_a_slot_lists_the_parts_held_and_commit_waits_for_the_rest(
    aggregator: TestClient, operator: dict, device: dict, spec: LoraSpec
) -> None:
    round_ = open_round(aggregator, operator, min_updates=2)
    data = update_file(spec, seed=1)
    slot = open_slot_for(aggregator, device["token"], round_["id"], data)

    put_parts(slot, data, only={1})
    early = commit(aggregator, device["token"], round_["id"], slot["slot"])
    status = aggregator.get(
        f"/v1/rounds/{round_['id']}/uploads/{slot['slot']}", headers=bearer(device["token"])
    ).json()
    put_parts(status, data)  # only the parts still missing have a URL
    done = commit(aggregator, device["token"], round_["id"], slot["slot"])

    assert early.status_code == 409 and "first: part 2" in early.json()["detail"]
    assert status["missing"] == len(slot["parts"]) - 1
    assert status["parts"][0]["url"] is None and all(p["url"] for p in status["parts"][1:])
    assert done.status_code == 201, done.text


@pytest.mark.parametrize("problem", ["not finite", "wrong sha256"])
def test_an_invalid_stored_object_is_refused_and_deleted(
    problem: str,
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=2)
    adapter = large_adapter(spec, 2)
    if problem == "not finite":
        key = sorted(adapter.tensors)[-1]
        adapter.tensors[key][0, 0] = torch.nan
        sent = declared = adapter_to_bytes(adapter, dtype="float32")
    else:
        sent, declared = adapter_to_bytes(adapter, dtype="float32"), update_file(spec, seed=3)
    body = {"size": len(sent), "sha256": hashlib.sha256(declared).hexdigest()}
    opened = aggregator.post(
        f"/v1/rounds/{round_['id']}/uploads", json=body, headers=bearer(device["token"])
    )
    slot = opened.json()

    put_parts(slot, sent)
    refused = commit(aggregator, device["token"], round_["id"], slot["slot"])

    assert refused.status_code == 422, refused.text
    expected_key = "sha256" if problem == "wrong sha256" else key
    assert refused.json()["key"] == expected_key
    assert nothing_stored(session, store, round_["id"], device["id"])
    gone = commit(aggregator, device["token"], round_["id"], slot["slot"])
    assert gone.status_code == 404  # the upload has ended with its object deleted


def test_unknown_expired_and_other_devices_slots_are_refused(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    other_device: dict,
    spec: LoraSpec,
    settings: Settings,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=2)
    data = update_file(spec)
    slot = open_slot_for(aggregator, device["token"], round_["id"], data)
    path = f"/v1/rounds/{round_['id']}/uploads"
    expired = open_slot(
        store=store,
        round_id=round_["id"],
        client_id=device["id"],
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        part_bytes=PART_BYTES,
        expiry_s=-1,
    )
    expired_token = sign_slot(expired, secret=settings.token_secret.get_secret_value())
    payload, _, mac = slot["slot"].partition(".")

    forged = aggregator.get(f"{path}/{payload}.{mac[::-1]}", headers=bearer(device["token"]))
    garbage = aggregator.get(f"{path}/not-a-slot", headers=bearer(device["token"]))
    someone_elses = aggregator.get(f"{path}/{slot['slot']}", headers=bearer(other_device["token"]))
    another_round = aggregator.get(
        f"/v1/rounds/{round_['id'] + 1}/uploads/{slot['slot']}", headers=bearer(device["token"])
    )
    late = commit(aggregator, device["token"], round_["id"], expired_token)

    for refused in (forged, garbage, someone_elses, another_round):
        assert refused.status_code == 404, refused.text
        assert refused.json()["detail"] == "no such upload slot for this device and round"
    assert late.status_code == 410 and "expired" in late.json()["detail"]
    with pytest.raises(ObjectNotFoundError):  # the expired slot's upload was aborted
        store.uploaded_parts(expired.key, upload_id=expired.upload_id)


def test_a_slot_is_refused_over_the_limit_or_outside_a_collecting_round(
    aggregator: TestClient, operator: dict, device: dict, settings: Settings
) -> None:
    round_ = open_round(aggregator, operator, min_updates=2, deadline_s=3600)
    too_big = {"size": 10**12, "sha256": "0" * 64}
    bad_sha = {"size": 10, "sha256": "xyz"}
    path = f"/v1/rounds/{round_['id']}/uploads"

    big = aggregator.post(path, json=too_big, headers=bearer(device["token"]))
    malformed = aggregator.post(path, json=bad_sha, headers=bearer(device["token"]))
    aggregator.post(f"/v1/rounds/{round_['id']}/cancel", headers=operator)
    closed = aggregator.post(path, json={**too_big, "size": 10}, headers=bearer(device["token"]))

    assert big.status_code == 413
    assert malformed.status_code == 422 and "xyz" not in malformed.text
    assert closed.status_code == 409
