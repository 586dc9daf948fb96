"""Buffered rounds through the HTTP API: a version every buffer_k updates, stale updates weighed
down, a device's several updates, a flush killed half-way redone once, an early close.

The aggregator's tasks wait on a queue of their own; each test runs the worker's flush itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.worker.buffered import LEFT_IN_BUFFER, aggregate_or_flush
from tessera.config import Settings
from tessera.events import TASK_AGGREGATE_ROUND
from tessera.lora import LoraAdapter, LoraSpec, adapter_from_bytes, adapter_to_bytes, random_adapter
from tessera.lora.bounds import ScaleRange
from tessera.models import Adapter, AdapterVersion, Update, UpdateStatus
from tessera.service.resources import Resources
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import make_clustering
from tests.services.aggregator.helpers import open_round, queued_tasks, upload

TOLERANCE = 2e-3  # relative, after the fp16 wire both ways
BUFFERED = {
    "mode": "buffered",
    "buffer_k": 2,
    "buffer_versions": 3,
    "lam": 0.0,
    "rank": 16,
    "weighting": "equal",
    "clip": "fixed",
    "clip_norm": 1e4,
    "staleness_exponent": 1.0,
}


@pytest.fixture
def resources(settings: Settings) -> Iterator[Resources]:
    res = Resources(settings)
    yield res
    res.close()


@pytest.fixture
def devices(aggregator: TestClient, operator_token: str, session: Session) -> list[dict]:
    """Three devices of cluster 0."""
    enrolled = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(3)]
    make_clustering(session, {d["id"]: 0 for d in enrolled})
    return enrolled


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """As in a worker process: MKL's threaded SVD crawls on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flush(resources: Resources, round_id: int) -> dict[str, Any]:
    settings = resources.settings
    return aggregate_or_flush(
        round_id,
        sessions=resources.sessions,
        store=resources.store,
        redis=resources.redis,
        scales=ScaleRange(settings.min_lora_scale, settings.max_lora_scale),
        stale_s=settings.task_stale_s,
    )


def send(
    aggregator: TestClient, device: dict, round_id: int, lora: LoraAdapter, base: int | None = None
) -> dict:
    params = {} if base is None else {"base_version_id": base}
    sent = upload(
        aggregator, device["token"], round_id, device["id"], adapter_to_bytes(lora), **params
    )
    assert sent.status_code in (200, 201), sent.text
    return dict(sent.json())


def versions(session: Session, round_id: int) -> list[AdapterVersion]:
    session.expire_all()
    return list(
        session.scalars(
            select(AdapterVersion)
            .where(AdapterVersion.round_id == round_id)
            .order_by(AdapterVersion.version)
        )
    )


def relative_error(
    published: AdapterVersion, store: ObjectStore, terms: list[tuple[LoraAdapter, float]]
) -> float:
    """||published - weighted mean of the products|| / ||that mean||, over all modules."""
    adapter = adapter_from_bytes(store.get_bytes(published.object_key))
    total = sum(weight for _, weight in terms)
    err = norm = 0.0
    for module in terms[0][0].modules:
        want = sum(lora.delta(module).double() * weight for lora, weight in terms) / total
        err += float((adapter.delta(module).double() - want).square().sum())
        norm += float(want.square().sum())
    return (err / norm) ** 0.5


@pytest.fixture
def updates(spec: LoraSpec) -> list[LoraAdapter]:
    return [random_adapter(spec, rank=4, alpha=4.0, seed=seed, std=0.3) for seed in range(6)]


def test_every_buffer_k_updates_publish_a_version_and_stale_ones_weigh_less(
    aggregator: TestClient,
    operator: dict,
    devices: list[dict],
    updates: list[LoraAdapter],
    resources: Resources,
    session: Session,
    broker: redis.Redis,
    store: ObjectStore,
) -> None:
    round_id = open_round(aggregator, operator, **BUFFERED)["id"]
    a, b, c = devices

    first = send(aggregator, a, round_id, updates[0])
    assert queued_tasks(broker) == []  # one update waits in the buffer
    send(aggregator, b, round_id, updates[1])
    queued = queued_tasks(broker)
    flush(resources, round_id)
    (v1,) = versions(session, round_id)
    # Device a's second local round, from v1, beside b's; then c, still on v1 though v2 is out,
    # beside a's third, from v2: c is one version behind and weighs (1 + 1) ** -1 of a's.
    send(aggregator, a, round_id, updates[2], base=v1.id)
    send(aggregator, b, round_id, updates[3], base=v1.id)
    flush(resources, round_id)
    v2 = versions(session, round_id)[1]
    send(aggregator, c, round_id, updates[4], base=v1.id)
    send(aggregator, a, round_id, updates[5], base=v2.id)
    flush(resources, round_id)
    late = upload(aggregator, b["token"], round_id, b["id"], adapter_to_bytes(updates[0]))
    state = aggregator.get(f"/v1/rounds/{round_id}", headers=operator).json()

    assert queued == [(TASK_AGGREGATE_ROUND, [round_id])]
    assert first["round_state"] == "collecting"
    published = versions(session, round_id)
    assert [(v.version, v.flush) for v in published] == [(1, 1), (2, 2), (3, 3)]
    assert session.scalars(select(Adapter.name).where(Adapter.id == v1.adapter_id)).one() == (
        "cluster:0"
    )
    assert relative_error(published[0], store, [(updates[0], 1.0), (updates[1], 1.0)]) < TOLERANCE
    assert relative_error(published[1], store, [(updates[2], 1.0), (updates[3], 1.0)]) < TOLERANCE
    stale = [(updates[4], 0.5), (updates[5], 1.0)]
    assert relative_error(published[2], store, stale) < TOLERANCE
    assert relative_error(published[2], store, [(u, 1.0) for u, _ in stale]) > 10 * TOLERANCE
    assert [v.metrics["stale_updates"] for v in published] == [0, 0, 1]
    rows = session.scalars(select(Update).where(Update.round_id == round_id)).all()
    assert sorted((r.client_id, r.seq) for r in rows) == sorted(
        [(a["id"], 0), (a["id"], 1), (a["id"], 2), (b["id"], 0), (b["id"], 1), (c["id"], 0)]
    )
    assert {r.status for r in rows} == {UpdateStatus.AGGREGATED}
    assert state["state"] == "published"  # its buffer_versions-th version published it
    assert late.status_code == 409


def test_the_same_bytes_again_are_a_resend_not_a_second_update(
    aggregator: TestClient,
    operator: dict,
    devices: list[dict],
    updates: list[LoraAdapter],
    session: Session,
    broker: redis.Redis,
) -> None:
    round_id = open_round(aggregator, operator, **BUFFERED)["id"]

    first = send(aggregator, devices[0], round_id, updates[0])
    again = send(aggregator, devices[0], round_id, updates[0])

    assert again["update_id"] == first["update_id"]
    assert len(session.scalars(select(Update).where(Update.round_id == round_id)).all()) == 1
    assert queued_tasks(broker) == []


class _KilledError(Exception):
    """Stands for the worker dying between writing a version's file and its commit."""


def test_a_flush_killed_half_way_is_redone_once(
    aggregator: TestClient,
    operator: dict,
    devices: list[dict],
    updates: list[LoraAdapter],
    resources: Resources,
    session: Session,
    store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    round_id = open_round(aggregator, operator, **BUFFERED)["id"]
    send(aggregator, devices[0], round_id, updates[0])
    send(aggregator, devices[1], round_id, updates[1])
    put_bytes = resources.store.put_bytes

    def dies_after_writing(key: str, data: bytes, **kwargs: Any) -> Any:
        put_bytes(key, data, **kwargs)
        raise _KilledError

    monkeypatch.setattr(resources.store, "put_bytes", dies_after_writing)
    with pytest.raises(_KilledError):
        flush(resources, round_id)
    after_crash = versions(session, round_id)
    waiting = session.scalars(select(Update.status).where(Update.round_id == round_id)).all()
    monkeypatch.undo()

    redone = flush(resources, round_id)
    again = flush(resources, round_id)

    assert after_crash == [] and set(waiting) == {UpdateStatus.RECEIVED}
    assert [a["version"] for a in redone["adapters"]] == [1] and again["adapters"] == []
    (version,) = versions(session, round_id)
    assert relative_error(version, store, [(updates[0], 1.0), (updates[1], 1.0)]) < TOLERANCE
    statuses = session.scalars(select(Update.status).where(Update.round_id == round_id)).all()
    assert statuses == [UpdateStatus.AGGREGATED] * 2


def test_a_closed_buffered_round_excludes_the_updates_left_in_its_buffers(
    aggregator: TestClient,
    operator: dict,
    devices: list[dict],
    updates: list[LoraAdapter],
    resources: Resources,
    session: Session,
) -> None:
    round_id = open_round(aggregator, operator, **BUFFERED)["id"]
    for device, lora in zip(devices, updates, strict=False):
        send(aggregator, device, round_id, lora)
    flush(resources, round_id)
    closed = aggregator.post(f"/v1/rounds/{round_id}/close", headers=operator)

    summary = flush(resources, round_id)

    assert closed.status_code == 200, closed.text
    assert summary["status"] == "published"
    state = aggregator.get(f"/v1/rounds/{round_id}", headers=operator).json()
    assert state["state"] == "published"
    assert [e["reason"] for e in state["excluded"]] == [LEFT_IN_BUFFER]
    assert len(versions(session, round_id)) == 1


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"mode": "buffered"}, "mode 'buffered' needs buffer_k and buffer_versions"),
        ({"buffer_k": 4}, "buffer_k and buffer_versions are for mode 'buffered' only"),
        ({**BUFFERED, "lam": 0.2}, "mode 'buffered' needs method 'exact' or 'fedavg', lam 0"),
        (
            {**BUFFERED, "method": "secure", "staleness_exponent": 0.0},
            "mode 'buffered' needs method 'exact' or 'fedavg'",
        ),
        (
            {**BUFFERED, "min_updates_per_cluster": 3},
            "mode 'buffered' needs min_updates_per_cluster at most buffer_k",
        ),
        ({**BUFFERED, "buffer_k": 0}, "buffer_k"),
        ({**BUFFERED, "buffer_versions": 123456}, "buffer_versions"),
        ({**BUFFERED, "mode": "fedbuff"}, "mode"),
    ],
)
def test_buffered_round_options_are_validated(
    aggregator: TestClient, operator: dict, config: dict, problem: str
) -> None:
    response = aggregator.post("/v1/rounds", json=config, headers=operator)

    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert problem in error["msg"] or error["loc"][-1] == problem
    assert "123456" not in response.text and "fedbuff" not in response.text


def test_a_device_reads_the_newest_version_between_local_rounds(
    aggregator: TestClient,
    operator: dict,
    devices: list[dict],
    updates: list[LoraAdapter],
    resources: Resources,
    session: Session,
) -> None:
    round_id = open_round(aggregator, operator, **BUFFERED)["id"]
    send(aggregator, devices[0], round_id, updates[0])
    send(aggregator, devices[1], round_id, updates[1])
    flush(resources, round_id)

    assignment = aggregator.get(
        "/v1/devices/me/assignment", headers=bearer(devices[2]["token"])
    ).json()

    (version,) = versions(session, round_id)
    assert assignment["start_adapter"]["version_id"] == version.id
    assert assignment["current_round"]["id"] == round_id
