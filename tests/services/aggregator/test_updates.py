"""LoRA update uploads: checked in full before anything is stored, idempotent, closing at quorum."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import torch
from fastapi import HTTPException
from fastapi.testclient import TestClient
from safetensors.torch import save
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from services.aggregator.routes import updates
from tessera.config import Settings
from tessera.events import TASK_AGGREGATE_ROUND
from tessera.federation import update_key
from tessera.lora import LoraSpec, read_header
from tessera.metrics import UPDATES_RECEIVED, UPDATES_REJECTED
from tessera.models import Round, RoundState, Update, UpdateStatus
from tessera.queue import make_celery
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.helpers import (
    lora,
    lora_file,
    nothing_stored,
    open_round,
    queued_tasks,
    upload,
)


def _rejected(reason: str) -> float:
    return UPDATES_REJECTED.labels(reason=reason)._value.get()


def test_upload_stores_the_file_and_records_the_update(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=2)
    data = lora_file(spec, seed=1)
    received = UPDATES_RECEIVED._value.get()

    response = upload(
        aggregator, device["token"], round_["id"], device["id"], data, train_loss=0.25
    )

    assert response.status_code == 201, response.text
    receipt = response.json()
    assert receipt["sha256"] == hashlib.sha256(data).hexdigest()
    assert receipt["size_bytes"] == len(data)
    assert receipt["replaced"] is False
    assert receipt["round_state"] == "collecting"
    row: Update = session.scalars(select(Update)).one()
    assert (row.round_id, row.client_id, row.num_samples) == (round_["id"], device["id"], 16)
    assert row.train_loss == 0.25
    assert row.status == UpdateStatus.RECEIVED
    assert row.object_key == update_key(round_["id"], device["id"], row.sha256)
    assert store.get_bytes(row.object_key, expected_sha256=row.sha256) == data
    assert UPDATES_RECEIVED._value.get() == received + 1
    assert queued_tasks(broker) == []


def test_a_reupload_replaces_the_update(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=2)
    first, second = lora_file(spec, seed=1), lora_file(spec, seed=2)

    created = upload(aggregator, device["token"], round_["id"], device["id"], first)
    replaced = upload(
        aggregator, device["token"], round_["id"], device["id"], second, num_samples=32
    )

    assert created.status_code == 201
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["replaced"] is True
    assert replaced.json()["update_id"] == created.json()["update_id"]
    row: Update = session.scalars(select(Update)).one()
    assert row.sha256 == hashlib.sha256(second).hexdigest()
    assert row.num_samples == 32
    assert store.get_bytes(row.object_key) == second
    first_key = update_key(round_["id"], device["id"], hashlib.sha256(first).hexdigest())
    assert row.object_key != first_key and not store.exists(first_key)  # deleted after commit


def test_quorum_closes_the_round_and_enqueues_its_aggregation(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    device: dict,
    other_device: dict,
    spec: LoraSpec,
    session: Session,
    broker: redis.Redis,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=2)

    first = upload(aggregator, device["token"], round_["id"], device["id"], lora_file(spec, 1))
    second = upload(
        aggregator, other_device["token"], round_["id"], other_device["id"], lora_file(spec, 2)
    )
    late = upload(aggregator, device["token"], round_["id"], device["id"], lora_file(spec, 3))

    assert first.json()["round_state"] == "collecting"
    assert second.json()["round_state"] == "aggregating"
    assert queued_tasks(broker) == [(TASK_AGGREGATE_ROUND, [round_["id"]])]
    stored = session.get_one(Round, round_["id"])
    assert stored.state == RoundState.AGGREGATING
    assert stored.closed_at is not None
    assert late.status_code == 409
    assert "aggregating" in late.json()["detail"]


def test_concurrent_uploads_reaching_quorum_enqueue_once(
    aggregator: TestClient, operator: dict, operator_token: str, spec: LoraSpec, broker: redis.Redis
) -> None:
    devices = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(4)]
    round_ = open_round(aggregator, operator, min_updates=3)
    files = [lora_file(spec, seed=i) for i in range(len(devices))]

    def send(index: int) -> int:
        d = devices[index]
        return upload(aggregator, d["token"], round_["id"], d["id"], files[index]).status_code

    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        statuses = list(pool.map(send, range(len(devices))))

    # The fourth may arrive after the round closed: then it is refused, not lost silently.
    assert sorted(statuses)[:3] == [201, 201, 201]
    assert set(statuses) <= {201, 409}
    assert queued_tasks(broker) == [(TASK_AGGREGATE_ROUND, [round_["id"]])]


def test_per_cluster_quorum_waits_for_every_cluster(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    broker: redis.Redis,
) -> None:
    from tests.services.aggregator.factories import make_clustering

    a, b, c = (enrol(aggregator, operator_token, f"edge-{n}") for n in "abc")
    make_clustering(session, {a["id"]: 0, b["id"]: 0, c["id"]: 1})
    round_ = open_round(aggregator, operator, min_updates=2, min_updates_per_cluster=1)

    for d, seed in ((a, 1), (b, 2)):
        assert upload(
            aggregator, d["token"], round_["id"], d["id"], lora_file(spec, seed)
        ).is_success
    waiting = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()
    last = upload(aggregator, c["token"], round_["id"], c["id"], lora_file(spec, 3))

    assert waiting["state"] == "collecting"
    assert waiting["quorum_met"] is False
    assert waiting["clusters"] == [
        {"label": 0, "members": 2, "updates": 2},
        {"label": 1, "members": 1, "updates": 0},
    ]
    assert last.json()["round_state"] == "aggregating"
    assert len(queued_tasks(broker)) == 1


# --- every refusal: a 4xx that says what is wrong, and nothing stored --------------------------


def _scale_first(spec: LoraSpec, value: float) -> dict:
    adapter = lora(spec)
    key = sorted(adapter.tensors)[0]
    tensors = dict(adapter.tensors)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    return {"tensors": tensors}


def _wrong_shape(spec: LoraSpec) -> dict:
    adapter = lora(spec)
    key = sorted(k for k in adapter.tensors if k.endswith("lora_A.weight"))[0]
    tensors = dict(adapter.tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    return {"tensors": tensors}


def _unknown_key(spec: LoraSpec) -> dict:
    adapter = lora(spec)
    return {"tensors": {**adapter.tensors, "mid_block.extra.to_q.lora_A.weight": torch.zeros(4, 8)}}


@pytest.mark.parametrize(
    ("changes", "key_part", "reason"),
    [
        (_wrong_shape, "lora_A.weight", "wrong_shape"),
        (lambda spec: _scale_first(spec, math.nan), "lora_", "not_finite"),
        (lambda spec: _scale_first(spec, math.inf), "lora_", "not_finite"),
        (_unknown_key, "", "unknown_keys"),
        (lambda spec: {"base_model_hash": "0" * 64}, "base_model_hash", "wrong_base_model"),
        (lambda spec: {"base_model_id": "someone/else"}, "base_model_id", "wrong_base_model"),
    ],
    ids=["shape", "nan", "inf", "unknown-key", "base-hash", "base-id"],
)
def test_a_bad_file_is_422_naming_the_key_and_nothing_is_stored(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    changes,
    key_part: str,
    reason: str,
) -> None:
    round_ = open_round(aggregator, operator)
    data = lora_file(spec, **changes(spec))
    before = _rejected(reason)

    response = upload(aggregator, device["token"], round_["id"], device["id"], data)

    assert response.status_code == 422, response.text
    body = response.json()
    assert key_part in body["key"]
    assert body["key"] in body["detail"]
    assert body.keys() == {"detail", "key", "expected"}  # what was found is never echoed
    assert "mid_block.extra" not in response.text
    assert _rejected(reason) == before + 1
    assert nothing_stored(session, store, round_["id"], device["id"])


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "1e400"])
def test_a_non_finite_alpha_is_422_without_echoing_it(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    alpha: str,
) -> None:
    round_ = open_round(aggregator, operator)
    data = bytes(
        save(
            {k: v.half() for k, v in lora(spec).tensors.items()},
            metadata={**read_header(lora_file(spec))[1], "alpha": alpha},
        )
    )

    response = upload(aggregator, device["token"], round_["id"], device["id"], data)

    assert response.status_code == 422, response.text
    assert response.json() == {
        "detail": "alpha: alpha must be positive and finite (expected > 0)",
        "key": "alpha",
        "expected": "> 0",
    }
    assert nothing_stored(session, store, round_["id"], device["id"])


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"a":' * 3000 + b"1" + b"}" * 3000, "nested too deeply"),
    ],
    ids=["deep-array", "deep-object"],
)
def test_a_header_nested_thousands_deep_is_422(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    session: Session,
    store: ObjectStore,
    header: bytes,
    words: str,
) -> None:
    round_ = open_round(aggregator, operator)
    data = struct.pack("<Q", len(header)) + header

    response = upload(aggregator, device["token"], round_["id"], device["id"], data)

    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]
    assert nothing_stored(session, store, round_["id"], device["id"])


@pytest.mark.parametrize("shape", [16, None, [-4, 16]], ids=["int", "null", "negative"])
def test_a_tensor_shape_that_is_not_a_list_of_counts_is_422(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    shape: object,
) -> None:
    round_ = open_round(aggregator, operator)
    data = lora_file(spec)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = shape
    patched = json.dumps(header).encode()

    response = upload(
        aggregator,
        device["token"],
        round_["id"],
        device["id"],
        struct.pack("<Q", len(patched)) + patched + data[8 + length :],
    )

    assert response.status_code == 422, response.text
    assert "shape must list non-negative integers" in response.json()["detail"]
    assert nothing_stored(session, store, round_["id"], device["id"])


def test_bytes_that_are_not_safetensors_are_422(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator)
    before = _rejected("bad_format")

    response = upload(aggregator, device["token"], round_["id"], device["id"], b"not a lora")

    assert response.status_code == 422
    assert "header" in response.json()["detail"]
    assert _rejected("bad_format") == before + 1
    assert nothing_stored(session, store, round_["id"], device["id"])


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"num_samples": None}, "num_samples"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 1_000_001}, "num_samples"),
        ({"num_samples": "many"}, "num_samples"),
        ({"train_loss": -0.5}, "train_loss"),
        ({"train_loss": "nan"}, "train_loss"),
        ({"train_loss": "inf"}, "train_loss"),
        ({"base_version_id": 0}, "base_version_id"),
        ({"base_version_id": 2**31}, "base_version_id"),
        ({"base_version_id": 2**63}, "base_version_id"),
    ],
)
def test_bad_metadata_is_422_naming_the_field(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    params: dict,
    field: str,
) -> None:
    round_ = open_round(aggregator, operator)
    params = {k: v for k, v in params.items()}
    path = f"/v1/rounds/{round_['id']}/updates/{device['id']}"
    query = {"num_samples": 16, **params}
    query = {k: v for k, v in query.items() if v is not None}

    response = aggregator.put(
        path, content=lora_file(spec), params=query, headers=bearer(device["token"])
    )

    assert response.status_code == 422, response.text
    assert any(e["loc"] == ["query", field] for e in response.json()["detail"])
    assert nothing_stored(session, store, round_["id"], device["id"])


@pytest.mark.parametrize("big", [2**31, 2**63])
def test_path_ids_outside_the_database_range_are_422(
    aggregator: TestClient, operator: dict, device: dict, spec: LoraSpec, big: int
) -> None:
    round_ = open_round(aggregator, operator)

    for round_id, client_id, field in (
        (big, device["id"], "round_id"),
        (round_["id"], big, "client_id"),
    ):
        response = upload(aggregator, device["token"], round_id, client_id, lora_file(spec))

        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["path", field]


def test_an_unknown_base_version_is_422(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator)

    response = upload(
        aggregator, device["token"], round_["id"], device["id"], lora_file(spec), base_version_id=99
    )

    assert response.status_code == 422
    assert response.json()["detail"] == "base_version_id is not a published adapter version"
    assert nothing_stored(session, store, round_["id"], device["id"])


def test_no_token_is_401(
    aggregator: TestClient, operator: dict, device: dict, spec: LoraSpec
) -> None:
    round_ = open_round(aggregator, operator)

    response = aggregator.put(
        f"/v1/rounds/{round_['id']}/updates/{device['id']}",
        content=lora_file(spec),
        params={"num_samples": 1},
    )

    assert response.status_code == 401


@pytest.mark.parametrize("role", ["operator", "generator"])
def test_other_roles_cannot_upload(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    role: str,
) -> None:
    round_ = open_round(aggregator, operator)
    token = (
        operator_token
        if role == "operator"
        else enrol(aggregator, operator_token, "gen", role)["token"]
    )

    response = upload(aggregator, token, round_["id"], device["id"], lora_file(spec))

    assert response.status_code == 403
    assert "device" in response.json()["detail"]
    assert nothing_stored(session, store, round_["id"], device["id"])


def test_a_device_cannot_upload_into_another_devices_slot(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    other_device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator)
    before = _rejected("not_allowed")

    response = upload(
        aggregator, device["token"], round_["id"], other_device["id"], lora_file(spec)
    )

    assert response.status_code == 403
    assert response.json()["detail"] == "a device can only upload its own update"
    assert _rejected("not_allowed") == before + 1
    assert nothing_stored(session, store, round_["id"], other_device["id"])


def test_an_unknown_round_is_404(aggregator: TestClient, device: dict, spec: LoraSpec) -> None:
    response = upload(aggregator, device["token"], 4242, device["id"], lora_file(spec))

    assert response.status_code == 404
    assert response.json()["detail"] == "no such round"


def test_a_round_that_is_not_collecting_is_409(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator)
    aggregator.post(f"/v1/rounds/{round_['id']}/cancel", headers=operator)
    before = _rejected("round_not_open")

    response = upload(aggregator, device["token"], round_["id"], device["id"], lora_file(spec))

    assert response.status_code == 409
    assert "cancelled, not collecting" in response.json()["detail"]
    assert _rejected("round_not_open") == before + 1
    assert nothing_stored(session, store, round_["id"], device["id"])


@pytest.fixture
def small_limit_aggregator(settings: Settings):
    with TestClient(create_app(settings.model_copy(update={"max_upload_bytes": 1000}))) as client:
        yield client


def test_an_update_over_the_limit_is_413_whether_or_not_it_declares_its_length(
    small_limit_aggregator: TestClient,
    operator_token: str,
    session: Session,
    store: ObjectStore,
) -> None:
    client = small_limit_aggregator
    device = enrol(client, operator_token, "edge-big")
    round_ = open_round(client, bearer(operator_token))
    path = f"/v1/rounds/{round_['id']}/updates/{device['id']}"
    before = _rejected("too_large")

    declared = upload(client, device["token"], round_["id"], device["id"], b"x" * 1001)
    streamed = client.put(
        path,
        content=(b"x" * 400 for _ in range(3)),
        params={"num_samples": 1},
        headers=bearer(device["token"]),
    )

    for response in (declared, streamed):
        assert response.status_code == 413
        assert "1000 bytes" in response.json()["detail"]
    assert _rejected("too_large") == before + 2
    assert nothing_stored(session, store, round_["id"], device["id"])


def test_json_routes_keep_the_small_request_limit(
    small_limit_aggregator: TestClient, operator_token: str
) -> None:
    # The upload limit applies under /v1/rounds/ only; the rest keeps max_request_bytes.
    response = small_limit_aggregator.post(
        "/v1/clients",
        content=b'{"name": "' + b"x" * 5_000_000 + b'"}',
        headers={**bearer(operator_token), "Content-Type": "application/json"},
    )

    assert response.status_code == 413


def test_a_round_closed_while_the_file_was_stored_takes_the_object_back(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    settings: Settings,
    session: Session,
    store: ObjectStore,
) -> None:
    # The state a request meets when the round closes between its first check and its write.
    round_ = open_round(aggregator, operator)
    aggregator.post(f"/v1/rounds/{round_['id']}/cancel", headers=operator)
    celery = make_celery(settings)

    with pytest.raises(HTTPException) as refused:
        updates._store_update(
            session=session,
            store=store,
            celery=celery,
            spec=spec,
            round_id=round_["id"],
            client_id=device["id"],
            data=lora_file(spec),
            meta=updates.UpdateMetadata(num_samples=1, base_version_id=None, train_loss=None),
        )
    celery.close()

    assert refused.value.status_code == 409
    assert nothing_stored(session, store, round_["id"], device["id"])
