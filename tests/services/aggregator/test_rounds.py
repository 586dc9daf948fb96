"""Rounds over HTTP: opening, reading progress, closing early, cancelling."""

from __future__ import annotations

import json
import math

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.aggregator import closing
from tessera.config import Settings
from tessera.events import TASK_AGGREGATE_ROUND
from tessera.lora import LoraSpec
from tessera.models import Round, RoundState
from tessera.queue import make_celery
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import make_clustering
from tests.services.aggregator.helpers import lora_file, open_round, queued_tasks, upload


def test_open_a_round_with_its_config(
    aggregator: TestClient, operator: dict, operator_token: str, session: Session
) -> None:
    device = enrol(aggregator, operator_token, "edge-01")
    clustering = make_clustering(session, {device["id"]: 0})

    first = open_round(aggregator, operator, method="fedavg", rank=4, deadline_s=60)

    assert first["number"] == 1
    assert first["state"] == "collecting"
    assert first["config"]["method"] == "fedavg"
    assert first["config"]["min_updates"] == 1  # defaults filled in
    assert first["config"]["power_passes"] == 1
    assert first["deadline"] is not None
    assert first["clustering_id"] == clustering.id
    assert first["updates"] == 0
    assert first["clusters"] == [{"label": 0, "members": 1, "updates": 0}]
    assert first["quorum_met"] is False
    assert first["published"] == []


def test_only_one_round_collects_at_a_time(aggregator: TestClient, operator: dict) -> None:
    first = open_round(aggregator, operator)

    second = aggregator.post("/v1/rounds", json={}, headers=operator)
    aggregator.post(f"/v1/rounds/{first['id']}/cancel", headers=operator)
    third = aggregator.post("/v1/rounds", json={}, headers=operator)

    assert second.status_code == 409
    assert "round 1" in second.json()["detail"]
    assert third.status_code == 201
    assert third.json()["number"] == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"rank": 0}, "rank"),
        ({"method": "median"}, "method"),
        ({"power_passes": 9}, "power_passes"),
        ({"power_passes": -1}, "power_passes"),
    ],
)
def test_a_bad_config_is_422(
    aggregator: TestClient, operator: dict, body: dict, field: str
) -> None:
    response = aggregator.post("/v1/rounds", json=body, headers=operator)

    assert response.status_code == 422
    assert field in [e["loc"][-1] for e in response.json()["detail"]]


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("temperature", 1e-320, "greater than or equal to 0.001"),
        ("temperature", math.nan, "finite number"),
        ("lam", math.nan, "finite number"),
        ("deadline_s", math.inf, "finite number"),
    ],
)
def test_a_config_float_must_be_finite_and_sensible(
    aggregator: TestClient, operator: dict, session: Session, field: str, value: float, problem: str
) -> None:
    body = json.dumps({field: value})  # json.dumps writes NaN and Infinity, which FastAPI reads

    response = aggregator.post(
        "/v1/rounds", content=body, headers={**operator, "Content-Type": "application/json"}
    )

    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert problem in error["msg"]
    assert session.scalar(select(func.count()).select_from(Round)) == 0


def test_devices_read_rounds_but_do_not_run_them(
    aggregator: TestClient, operator: dict, device: dict
) -> None:
    round_ = open_round(aggregator, operator)
    token = bearer(device["token"])

    assert aggregator.get("/v1/rounds/current", headers=token).json()["id"] == round_["id"]
    assert aggregator.get(f"/v1/rounds/{round_['id']}", headers=token).status_code == 200
    assert aggregator.get("/v1/rounds", headers=token).status_code == 403
    assert aggregator.post("/v1/rounds", json={}, headers=token).status_code == 403
    assert aggregator.post(f"/v1/rounds/{round_['id']}/close", headers=token).status_code == 403
    assert aggregator.post(f"/v1/rounds/{round_['id']}/cancel", headers=token).status_code == 403


def test_unknown_rounds_are_404(aggregator: TestClient, operator: dict) -> None:
    assert aggregator.get("/v1/rounds/current", headers=operator).status_code == 404
    for response in (
        aggregator.get("/v1/rounds/77", headers=operator),
        aggregator.post("/v1/rounds/77/close", headers=operator),
        aggregator.post("/v1/rounds/77/cancel", headers=operator),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] == "no such round"


@pytest.mark.parametrize("round_id", [0, 2**31, 2**63, 2**64])
def test_round_ids_outside_the_database_range_are_422(
    aggregator: TestClient, operator: dict, round_id: int
) -> None:
    for response in (
        aggregator.get(f"/v1/rounds/{round_id}", headers=operator),
        aggregator.post(f"/v1/rounds/{round_id}/close", headers=operator),
        aggregator.post(f"/v1/rounds/{round_id}/cancel", headers=operator),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["path", "round_id"]


def test_list_rounds_newest_first(aggregator: TestClient, operator: dict) -> None:
    for _ in range(3):
        round_ = open_round(aggregator, operator)
        aggregator.post(f"/v1/rounds/{round_['id']}/cancel", headers=operator)

    listed = aggregator.get("/v1/rounds", params={"limit": 2}, headers=operator).json()

    assert [r["number"] for r in listed] == [3, 2]
    assert all(r["state"] == "cancelled" for r in listed)


def test_close_early_enqueues_the_aggregation(
    aggregator: TestClient, operator: dict, device: dict, spec: LoraSpec, broker: redis.Redis
) -> None:
    round_ = open_round(aggregator, operator, min_updates=5)
    empty_close = aggregator.post(f"/v1/rounds/{round_['id']}/close", headers=operator)
    upload(aggregator, device["token"], round_["id"], device["id"], lora_file(spec))

    closed = aggregator.post(f"/v1/rounds/{round_['id']}/close", headers=operator)
    again = aggregator.post(f"/v1/rounds/{round_['id']}/close", headers=operator)
    cancel = aggregator.post(f"/v1/rounds/{round_['id']}/cancel", headers=operator)

    assert empty_close.status_code == 409
    assert "no updates" in empty_close.json()["detail"]
    assert closed.status_code == 200, closed.text
    assert closed.json()["state"] == "aggregating"
    assert closed.json()["updates"] == 1
    assert closed.json()["unassigned_updates"] == 1
    assert again.status_code == 409
    assert "aggregating, not collecting" in again.json()["detail"]
    assert cancel.status_code == 409
    assert queued_tasks(broker) == [(TASK_AGGREGATE_ROUND, [round_["id"]])]


def test_cancel_a_collecting_round(aggregator: TestClient, operator: dict) -> None:
    round_ = open_round(aggregator, operator)

    cancelled = aggregator.post(f"/v1/rounds/{round_['id']}/cancel", headers=operator)

    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["closed_at"] is not None


def test_closing_twice_enqueues_once(
    aggregator: TestClient,
    operator: dict,
    settings: Settings,
    session: Session,
    broker: redis.Redis,
) -> None:
    round_ = open_round(aggregator, operator)
    celery = make_celery(settings)

    first = closing.close_round(session=session, celery=celery, round_id=round_["id"], why="test")
    second = closing.close_round(session=session, celery=celery, round_id=round_["id"], why="test")
    celery.close()

    assert (first, second) == (True, False)
    assert len(queued_tasks(broker)) == 1


def test_a_failed_enqueue_leaves_the_round_collecting(
    aggregator: TestClient, operator: dict, settings: Settings, session: Session
) -> None:
    round_ = open_round(aggregator, operator)
    nowhere = make_celery(settings.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"}))

    with pytest.raises(closing.EnqueueError, match=f"round {round_['id']}"):
        closing.close_round(session=session, celery=nowhere, round_id=round_["id"], why="test")
    nowhere.close()

    state = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()["state"]
    assert state == RoundState.COLLECTING
