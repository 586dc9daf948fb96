"""Generation jobs that would never run: a silent worker's batch goes back to the queue, then
fails visibly with a final event; queued jobs whose messages were lost get new ones (the
loop's functions on the real database, Redis and queue, and the loop itself across a Valkey
restarted without its data)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.inference.api.main import create_app
from services.inference.api.stalled import MAX_JOB_RUNS, requeue_stalled_jobs, wake_lost_jobs
from tessera import procs
from tessera.config import Settings
from tessera.devstack import EmbeddedValkey
from tessera.events import TASK_GENERATE, generation_channel
from tessera.models import GenerationJob, JobState, Role, utcnow
from tessera.queue import make_celery
from tests.helpers import bearer
from tests.services.inference.helpers import embeds_b64, make_client, queued_jobs, tokens


@pytest.fixture
def celery(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


def _job(
    session: Session,
    client_id: int,
    *,
    state: JobState = JobState.RUNNING,
    leader: str | None = None,
    attempts: int = 1,
    age_s: float = 300,
) -> str:
    """A job a worker started `age_s` ago and has not reported on since (or, queued, one
    submitted `age_s` ago)."""
    then = utcnow() - timedelta(seconds=age_s)
    running = state is JobState.RUNNING
    job = GenerationJob(
        id=str(uuid.uuid4()),
        client_id=client_id,
        state=state,
        params={"steps": 4},
        created_at=then,
        started_at=then if running else None,
        heartbeat_at=then if running else None,
        attempts=attempts,
        batch_leader=leader,
    )
    session.add(job)
    session.commit()
    return job.id


def _states(session: Session, *job_ids: str) -> list[tuple[JobState, str | None]]:
    session.expire_all()
    return [
        (job.state, job.batch_leader)
        for job in (session.get_one(GenerationJob, job_id) for job_id in job_ids)
    ]


def test_a_silent_batch_goes_back_to_the_queue_once(
    settings: Settings,
    session: Session,
    sessions: sessionmaker[Session],
    broker: redis.Redis,
    celery: Celery,
) -> None:
    client_id, _ = make_client(session, settings, Role.GENERATOR)
    leader = _job(session, client_id)
    follower = _job(session, client_id, leader=leader)
    alive = _job(session, client_id, age_s=1)  # its worker beat a second ago
    now = utcnow()

    requeued = requeue_stalled_jobs(
        sessions=sessions, celery=celery, redis_client=broker, stale_s=60, now=now
    )
    again = requeue_stalled_jobs(
        sessions=sessions, celery=celery, redis_client=broker, stale_s=60, now=now
    )

    assert requeued == {"requeued": [leader, follower], "failed": []}
    assert again == {"requeued": [], "failed": []}  # queued now: nothing to take back twice
    assert _states(session, leader, follower) == [(JobState.QUEUED, None)] * 2
    assert _states(session, alive) == [(JobState.RUNNING, None)]
    assert queued_jobs(broker) == [(TASK_GENERATE, [leader]), (TASK_GENERATE, [follower])]


def test_a_job_whose_worker_died_each_run_fails_with_its_batch_and_a_final_event(
    settings: Settings,
    session: Session,
    sessions: sessionmaker[Session],
    broker: redis.Redis,
    celery: Celery,
) -> None:
    client_id, _ = make_client(session, settings, Role.GENERATOR)
    leader = _job(session, client_id, attempts=MAX_JOB_RUNS)
    follower = _job(session, client_id, leader=leader)
    listener = broker.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(generation_channel(leader), generation_channel(follower))

    given_up = requeue_stalled_jobs(
        sessions=sessions, celery=celery, redis_client=broker, stale_s=60
    )
    events = []
    for _ in range(20):
        message = listener.get_message(timeout=0.1)
        if message is not None:
            events.append(json.loads(message["data"]))
    listener.close()

    assert given_up == {"requeued": [], "failed": [leader, follower]}
    assert queued_jobs(broker) == []
    session.expire_all()
    for job_id in (leader, follower):
        job = session.get_one(GenerationJob, job_id)
        assert job.state == JobState.FAILED and job.finished_at is not None
        assert f"stopped {MAX_JOB_RUNS} times" in (job.error or "")
    assert sorted(event["id"] for event in events) == sorted([leader, follower])
    assert all(event["state"] == "failed" for event in events)


def test_queued_jobs_whose_messages_were_lost_are_sent_again(
    settings: Settings,
    session: Session,
    sessions: sessionmaker[Session],
    broker: redis.Redis,
    celery: Celery,
) -> None:
    client_id, _ = make_client(session, settings, Role.GENERATOR)
    old = [_job(session, client_id, state=JobState.QUEUED, age_s=120 + n) for n in (2, 1)]
    _job(session, client_id, state=JobState.QUEUED, age_s=0)  # its message is on its way
    celery.send_task(TASK_GENERATE, args=[old[0]], queue="inference")  # one message survived

    young = wake_lost_jobs(
        sessions=sessions,
        celery=celery,
        redis_client=broker,
        stale_s=600,  # the oldest queued job has not waited that long yet
    )
    woken = wake_lost_jobs(sessions=sessions, celery=celery, redis_client=broker, stale_s=60)
    again = wake_lost_jobs(sessions=sessions, celery=celery, redis_client=broker, stale_s=60)

    assert young == []
    assert woken == old  # three queued, one message: two more, sent for the oldest
    assert again == []  # as many messages as queued jobs now
    assert len(queued_jobs(broker)) == 3


def test_a_job_queued_before_redis_restarted_empty_gets_a_new_message(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    valkey = EmbeddedValkey(tmp_path / "valkey", persistent=False)  # restarts empty
    own = settings.model_copy(
        update={"redis_url": valkey.start(), "task_stale_s": 1.0, "housekeeping_interval_s": 0.2}
    )
    _, token = make_client(session, own, Role.GENERATOR)
    body = {"prompt_embeds": embeds_b64(tokens()), "adapters": [], "steps": 2, "seed": 1}
    try:
        with TestClient(create_app(own)) as api:  # the job loop, every 0.2 s
            job_id = api.post("/v1/generations", json=body, headers=bearer(token)).json()["id"]
            valkey.stop()
            valkey.start()  # the same port, no data: the job's message is gone
            restarted = redis.Redis.from_url(own.redis_url or "")
            lost = queued_jobs(restarted)
            started = time.monotonic()
            procs.wait_until(lambda: queued_jobs(restarted) != [], timeout=30, what="a new message")
            took = time.monotonic() - started
            again = queued_jobs(restarted)
            restarted.close()
    finally:
        valkey.stop()

    print(f"Valkey restarted empty: the queued job's message sent again {took:.1f} s after")
    assert lost == []
    assert again == [(TASK_GENERATE, [job_id])]
    assert _states(session, job_id) == [(JobState.QUEUED, None)]
