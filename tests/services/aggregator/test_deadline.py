"""A round's deadline closes it without any request: the aggregator's background loop."""

from __future__ import annotations

import time

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator import closing
from services.aggregator.deps import get_base_model_facts
from services.aggregator.main import create_app
from tessera.config import Settings
from tessera.events import TASK_AGGREGATE_ROUND
from tessera.federation import NO_UPDATES_AT_DEADLINE
from tessera.lora import LoraSpec
from tessera.models import Round, RoundState
from tests.helpers import bearer, enrol
from tests.services.aggregator.helpers import lora_file, open_round, queued_tasks, upload


def _wait_for_state(session: Session, round_id: int, timeout: float = 10) -> RoundState:
    deadline = time.monotonic() + timeout
    while True:
        session.expire_all()
        state = session.get_one(Round, round_id).state
        if state != RoundState.COLLECTING or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def test_the_loop_closes_rounds_past_their_deadline(
    settings: Settings,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(closing, "DEADLINE_CHECK_INTERVAL_S", 0.05)
    operator = bearer(operator_token)
    data = lora_file(spec)
    get_base_model_facts(settings)  # loaded before the clock starts
    with TestClient(create_app(settings)) as client:
        device = enrol(client, operator_token, "edge-01")
        empty = open_round(client, operator, deadline_s=0.3)
        empty_state = _wait_for_state(session, empty["id"])
        busy = open_round(client, operator, deadline_s=1.5, min_updates=10)
        uploaded = upload(client, device["token"], busy["id"], device["id"], data)
        busy_state = _wait_for_state(session, busy["id"])

    assert uploaded.status_code == 201
    assert empty_state == RoundState.CANCELLED
    assert session.get_one(Round, empty["id"]).error == NO_UPDATES_AT_DEADLINE
    assert busy_state == RoundState.AGGREGATING
    assert queued_tasks(broker) == [(TASK_AGGREGATE_ROUND, [busy["id"]])]


def test_reading_a_round_past_its_deadline_closes_it(
    aggregator: TestClient,
    settings: Settings,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(closing, "DEADLINE_CHECK_INTERVAL_S", 3600)  # the loop sleeps
    first, second = lora_file(spec, 1), lora_file(spec, 2)
    get_base_model_facts(settings)
    round_ = open_round(aggregator, operator, deadline_s=1.0, min_updates=10)
    uploaded = upload(aggregator, device["token"], round_["id"], device["id"], first)
    time.sleep(1.1)

    late = upload(aggregator, device["token"], round_["id"], device["id"], second)
    read = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()

    assert uploaded.status_code == 201
    assert late.status_code == 409
    assert read["state"] == "aggregating"
    assert queued_tasks(broker) == [(TASK_AGGREGATE_ROUND, [round_["id"]])]
