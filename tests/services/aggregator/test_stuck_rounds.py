"""Rounds stuck in aggregating: queued again by the round loop, retried or failed by hand
(API and CLI)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from services.aggregator.stuck import MAX_AGGREGATION_RUNS, requeue_stale_rounds
from tessera import db
from tessera.config import Settings
from tessera.events import TASK_AGGREGATE_ROUND
from tessera.lora import LoraSpec
from tessera.models import Round, RoundState, utcnow
from tessera.queue import make_celery
from tests.helpers import bearer, run_cli, stack_env
from tests.services.aggregator.helpers import lora_file, open_round, queued_tasks, upload
from tests.serving import served


def _aggregating(client: TestClient, operator: dict, device: dict, spec: LoraSpec) -> int:
    """A round that a close moved to aggregating (its task queued, no worker to take it)."""
    round_ = open_round(client, operator, min_updates=5)
    upload(client, device["token"], round_["id"], device["id"], lora_file(spec))
    closed = client.post(f"/v1/rounds/{round_['id']}/close", headers=operator)
    assert closed.status_code == 200, closed.text
    return int(round_["id"])


def test_a_round_whose_worker_stopped_is_queued_again_then_failed(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    settings: Settings,
    session: Session,
    broker: redis.Redis,
) -> None:
    round_id = _aggregating(aggregator, operator, device, spec)
    sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))
    celery = make_celery(settings)
    stale_s = 60.0
    soon, later = utcnow() + timedelta(seconds=30), utcnow() + timedelta(seconds=61)

    fresh = requeue_stale_rounds(sessions=sessions, celery=celery, stale_s=stale_s, now=soon)
    requeued = requeue_stale_rounds(sessions=sessions, celery=celery, stale_s=stale_s, now=later)
    again = requeue_stale_rounds(sessions=sessions, celery=celery, stale_s=stale_s, now=later)
    row = session.get_one(Round, round_id)
    row.attempts = MAX_AGGREGATION_RUNS  # every run's worker died
    session.commit()
    much_later = later + timedelta(seconds=61)
    given_up = requeue_stale_rounds(
        sessions=sessions, celery=celery, stale_s=stale_s, now=much_later
    )
    celery.close()

    assert fresh == {"requeued": [], "failed": []}
    assert requeued == {"requeued": [round_id], "failed": []}
    assert again == {"requeued": [], "failed": []}  # the next pass waits a stale period more
    assert given_up == {"requeued": [], "failed": [round_id]}
    assert queued_tasks(broker) == [(TASK_AGGREGATE_ROUND, [round_id])] * 2
    session.expire_all()
    failed = session.get_one(Round, round_id)
    assert failed.state == RoundState.FAILED
    assert "tessera round retry" in (failed.error or "")


def test_an_operator_fails_and_retries_a_stuck_round(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    broker: redis.Redis,
) -> None:
    round_id = _aggregating(aggregator, operator, device, spec)
    collecting = open_round(aggregator, operator)

    as_device = aggregator.post(f"/v1/rounds/{round_id}/fail", headers=bearer(device["token"]))
    failed = aggregator.post(f"/v1/rounds/{round_id}/fail", headers=operator)
    failed_again = aggregator.post(f"/v1/rounds/{round_id}/fail", headers=operator)
    retried = aggregator.post(f"/v1/rounds/{round_id}/retry", headers=operator)
    not_stuck = aggregator.post(f"/v1/rounds/{collecting['id']}/retry", headers=operator)
    unknown = aggregator.post("/v1/rounds/999999/retry", headers=operator)

    assert as_device.status_code == 403
    assert failed.status_code == 200, failed.text
    assert failed.json()["state"] == "failed"
    assert failed.json()["error"] == "failed by bootstrap-operator"
    assert failed_again.status_code == 409
    assert "not aggregating" in failed_again.json()["detail"]
    assert retried.status_code == 200, retried.text
    assert retried.json()["state"] == "aggregating"
    assert retried.json()["error"] is None and retried.json()["attempts"] == 0
    assert not_stuck.status_code == 409
    assert "collecting" in not_stuck.json()["detail"]
    assert unknown.status_code == 404
    assert queued_tasks(broker) == [(TASK_AGGREGATE_ROUND, [round_id])] * 2  # close, retry


@pytest.mark.slow
def test_the_cli_fails_and_retries_a_stuck_round(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    settings: Settings,
    session: Session,
    tmp_path: Path,
) -> None:
    round_id = _aggregating(aggregator, operator, device, spec)
    with served(create_app(settings)) as url:
        env = {
            **stack_env(tmp_path),
            "TESSERA_AGGREGATOR_URL": url,
            "TESSERA_OPERATOR_TOKEN": settings.operator_token.get_secret_value(),
        }
        failed = run_cli("round", "fail", str(round_id), env=env, timeout=120)
        state_after_fail = session.get_one(Round, round_id).state
        again = run_cli("round", "fail", str(round_id), env=env, timeout=120)
        retried = run_cli("round", "retry", str(round_id), env=env, timeout=120)
    session.expire_all()

    assert failed.returncode == 0, failed.stderr
    assert '"state": "failed"' in failed.stdout
    assert state_after_fail == RoundState.FAILED
    assert again.returncode != 0 and "409" in again.stderr
    assert retried.returncode == 0, retried.stderr
    assert '"state": "aggregating"' in retried.stdout
    assert session.get_one(Round, round_id).state == RoundState.AGGREGATING
