"""Generation jobs whose worker went silent: queued again, then failed visibly with a final
event (the loop's function, on the real database, Redis and queue)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import redis
from sqlalchemy.orm import Session, sessionmaker

from services.inference.api.stalled import MAX_JOB_RUNS, requeue_stalled_jobs
from tessera.config import Settings
from tessera.events import TASK_GENERATE, generation_channel
from tessera.models import GenerationJob, JobState, Role, utcnow
from tessera.queue import make_celery
from tests.services.inference.helpers import make_client, queued_jobs


def _running(session: Session, client_id: int, *, leader: str | None = None) -> str:
    """A job a worker started a while ago and has not reported on since."""
    job = GenerationJob(
        id=str(uuid.uuid4()),
        client_id=client_id,
        state=JobState.RUNNING,
        params={"steps": 4},
        started_at=utcnow() - timedelta(minutes=5),
        heartbeat_at=utcnow() - timedelta(minutes=5),
        attempts=1,
        batch_leader=leader,
    )
    session.add(job)
    session.commit()
    return job.id


def test_a_silent_job_is_queued_again_then_failed_with_its_batch(
    settings: Settings,
    session: Session,
    sessions: sessionmaker[Session],
    broker: redis.Redis,
) -> None:
    client_id, _ = make_client(session, settings, Role.GENERATOR)
    leader = _running(session, client_id)
    follower = _running(session, client_id, leader=leader)
    celery = make_celery(settings)
    listener = broker.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(generation_channel(leader), generation_channel(follower))
    now = utcnow()

    requeued = requeue_stalled_jobs(
        sessions=sessions, celery=celery, redis_client=broker, stale_s=60, now=now
    )
    again = requeue_stalled_jobs(
        sessions=sessions, celery=celery, redis_client=broker, stale_s=60, now=now
    )
    session.expire_all()
    session.get_one(GenerationJob, leader).attempts = MAX_JOB_RUNS  # each run's worker died
    session.commit()
    later = now + timedelta(seconds=61)
    given_up = requeue_stalled_jobs(
        sessions=sessions, celery=celery, redis_client=broker, stale_s=60, now=later
    )
    celery.close()
    events = []
    for _ in range(20):
        message = listener.get_message(timeout=0.1)
        if message is not None:
            events.append(json.loads(message["data"]))
    listener.close()

    assert requeued == {"requeued": [leader], "failed": []}  # a follower comes back with it
    assert again == {"requeued": [], "failed": []}  # the next pass waits a stale period more
    assert given_up == {"requeued": [], "failed": [leader, follower]}
    assert queued_jobs(broker) == [(TASK_GENERATE, [leader])]
    session.expire_all()
    for job_id in (leader, follower):
        job = session.get_one(GenerationJob, job_id)
        assert job.state == JobState.FAILED and job.finished_at is not None
        assert f"stopped {MAX_JOB_RUNS} times" in (job.error or "")
    assert sorted(event["id"] for event in events) == sorted([leader, follower])
    assert all(event["state"] == "failed" for event in events)
