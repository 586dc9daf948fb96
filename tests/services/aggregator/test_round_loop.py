"""The aggregator's round loop, the one place rounds finish: deadlines, quorum, an atomic
deadline cancel, content-addressed re-uploads and the orphan sweep; re-clustering jobs whose
worker died, and re-clusterings for drift."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from fastapi import HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from services.aggregator import closing, crud
from services.aggregator.deps import get_base_model_facts
from services.aggregator.main import create_app
from services.aggregator.orphans import sweep_orphaned_updates
from services.aggregator.routes import updates
from services.clustering import crud as clustering_crud
from tessera import db
from tessera.config import Settings
from tessera.events import TASK_AGGREGATE_ROUND, TASK_RECLUSTER
from tessera.federation import NO_UPDATES_AT_DEADLINE, update_key
from tessera.lora import LoraSpec
from tessera.models import (
    Client,
    ClusteringJob,
    JobState,
    Role,
    Round,
    RoundState,
    Update,
    UpdateStatus,
    utcnow,
)
from tessera.queue import make_celery
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.helpers import lora_file, open_round, queued_tasks, upload
from tests.services.clustering.helpers import add_device


def _wait_for_state(session: Session, round_id: int, timeout: float = 10) -> RoundState:
    deadline = time.monotonic() + timeout
    while True:
        session.expire_all()
        state = session.get_one(Round, round_id).state
        if state != RoundState.COLLECTING or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def _meta() -> updates.UpdateMetadata:
    return updates.UpdateMetadata(num_samples=1, base_version_id=None, train_loss=None)


def test_the_loop_closes_rounds_at_their_deadline_and_at_quorum(
    settings: Settings,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    fast = settings.model_copy(update={"housekeeping_interval_s": 0.05})
    operator = bearer(operator_token)
    get_base_model_facts(settings)  # loaded before the clock starts
    nowhere = make_celery(settings.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"}))
    with TestClient(create_app(fast)) as client:
        device = enrol(client, operator_token, "edge-01")
        empty = open_round(client, operator, deadline_s=0.3)
        empty_state = _wait_for_state(session, empty["id"])
        busy = open_round(client, operator, deadline_s=1.5, min_updates=10)
        uploaded = upload(client, device["token"], busy["id"], device["id"], lora_file(spec))
        busy_state = _wait_for_state(session, busy["id"])
        # An upload reaches quorum but its close cannot be enqueued (Redis away for it): the
        # round would have stayed collecting until another upload; the loop closes it.
        at_quorum = open_round(client, operator, min_updates=1)
        updates._store_update(
            session=session,
            store=store,
            celery=nowhere,
            spec=spec,
            round_id=at_quorum["id"],
            client_id=device["id"],
            data=lora_file(spec, 2),
            meta=_meta(),
        )
        quorum_state = _wait_for_state(session, at_quorum["id"])
    nowhere.close()

    assert uploaded.status_code == 201
    assert empty_state == RoundState.CANCELLED
    assert session.get_one(Round, empty["id"]).error == NO_UPDATES_AT_DEADLINE
    assert busy_state == RoundState.AGGREGATING
    assert quorum_state == RoundState.AGGREGATING
    # The upload's own close could not reach Redis: the second message is the loop's.
    assert queued_tasks(broker) == [
        (TASK_AGGREGATE_ROUND, [busy["id"]]),
        (TASK_AGGREGATE_ROUND, [at_quorum["id"]]),
    ]


def test_a_deadline_cancel_counts_an_upload_that_commits_meanwhile(
    settings: Settings, session: Session, broker: redis.Redis
) -> None:
    device = Client(name="edge-race", role=Role.DEVICE, token_hash="0" * 64)
    round_ = Round(number=1, state=RoundState.COLLECTING, deadline=utcnow() - timedelta(seconds=1))
    session.add_all([device, round_])
    session.commit()
    sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))
    celery = make_celery(settings)
    # An upload between its row lock and its commit, as `_store_update` holds it.
    uploading = sessions()
    assert crud.hold_collecting_round(session=uploading, round_id=round_.id)
    uploading.add(
        Update(
            client_id=device.id,
            round_id=round_.id,
            object_key="updates/k",
            sha256="0" * 64,
            size_bytes=1,
            num_samples=1,
            status=UpdateStatus.RECEIVED,
        )
    )
    uploading.flush()
    outcome: dict[str, bool] = {}

    def close_at_deadline() -> None:
        with sessions() as closer:
            outcome["closed"] = closing.close_at_deadline(
                session=closer, celery=celery, round_id=round_.id
            )

    closer = threading.Thread(target=close_at_deadline)
    closer.start()
    closer.join(0.5)
    waited = closer.is_alive()
    uploading.commit()
    uploading.close()
    closer.join(20)
    celery.close()

    session.expire_all()
    assert waited  # the cancel waits for the upload's commit instead of counting before it
    assert outcome == {"closed": True}
    assert session.get_one(Round, round_.id).state == RoundState.AGGREGATING
    assert queued_tasks(broker) == [(TASK_AGGREGATE_ROUND, [round_.id])]


def test_a_reupload_refused_by_a_closed_round_leaves_the_accepted_update(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    settings: Settings,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=5)
    first, second = lora_file(spec, 1), lora_file(spec, 2)
    accepted = upload(aggregator, device["token"], round_["id"], device["id"], first)
    # The round closes between the re-upload's first check and its write.
    closed = aggregator.post(f"/v1/rounds/{round_['id']}/close", headers=operator)
    celery = make_celery(settings)

    with pytest.raises(HTTPException) as refused:
        updates._store_update(
            session=session,
            store=store,
            celery=celery,
            spec=spec,
            round_id=round_["id"],
            client_id=device["id"],
            data=second,
            meta=_meta(),
        )
    celery.close()

    assert accepted.status_code == 201 and closed.status_code == 200
    assert refused.value.status_code == 409
    session.expire_all()
    row = crud.get_update(session=session, round_id=round_["id"], client_id=device["id"])
    assert row is not None and row.sha256 == hashlib.sha256(first).hexdigest()
    assert store.get_bytes(row.object_key, expected_sha256=row.sha256) == first
    slot = update_key(round_["id"], device["id"], "").rsplit("/", 1)[0] + "/"
    assert store.list_keys(slot) == [row.object_key]  # the refused object is gone


def test_the_sweep_deletes_old_objects_that_no_update_names(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    settings: Settings,
    session: Session,
    store: ObjectStore,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=5)
    upload(aggregator, device["token"], round_["id"], device["id"], lora_file(spec))
    row = crud.get_update(session=session, round_id=round_["id"], client_id=device["id"])
    assert row is not None
    # What an aggregator killed between the object write and the row's commit leaves behind.
    orphan = store.put_bytes(update_key(round_["id"], device["id"], "f" * 64), b"never committed")
    sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))

    young = sweep_orphaned_updates(sessions=sessions, store=store)
    later = utcnow() + timedelta(seconds=5)
    swept = sweep_orphaned_updates(sessions=sessions, store=store, grace_s=0, now=later)

    assert young == []  # an upload between its write and its commit is never touched
    assert swept == [orphan.key]
    assert not store.exists(orphan.key)
    assert store.exists(row.object_key)


def _wait_for_job(session: Session, where: ColumnElement[bool], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        session.expire_all()
        job = session.scalars(select(ClusteringJob).where(where)).first()
        if job is not None or time.monotonic() > deadline:
            return job


def test_the_loop_queues_a_reclustering_when_the_clusters_drift(
    settings: Settings, session: Session, broker: redis.Redis
) -> None:
    fast = settings.model_copy(update={"housekeeping_interval_s": 0.05})
    for i in range(9):
        add_device(session, settings, f"edge-{i}", i % 3, seed=i)
    clustering_crud.recluster(session=session, k=3)
    session.commit()
    # Four devices land far from every centroid: 4 of 13 (31%) are far, above the 25% default.
    for i in range(4):
        newcomer = add_device(session, settings, f"far-{i}", -1, seed=50 + i)
        clustering_crud.assign_device(session=session, client_id=newcomer.id)
        session.commit()
    with TestClient(create_app(fast)):
        job = _wait_for_job(session, ClusteringJob.trigger == "drift")

    assert job is not None and job.state == JobState.QUEUED and job.base_version == 1
    assert queued_tasks(broker) == [(TASK_RECLUSTER, [job.id])]


def test_the_loop_queues_again_a_reclustering_whose_worker_died(
    settings: Settings, session: Session, broker: redis.Redis
) -> None:
    fast = settings.model_copy(update={"housekeeping_interval_s": 0.05, "task_stale_s": 1})
    long_ago = utcnow() - timedelta(minutes=5)
    dead = ClusteringJob(
        state=JobState.RUNNING, trigger="operator", params={}, attempts=1, heartbeat_at=long_ago
    )
    session.add(dead)
    session.commit()
    with TestClient(create_app(fast)):
        requeued = _wait_for_job(
            session, (ClusteringJob.id == dead.id) & (ClusteringJob.state == JobState.QUEUED)
        )

    assert requeued is not None and requeued.attempts == 1
    assert queued_tasks(broker) == [(TASK_RECLUSTER, [dead.id])]
