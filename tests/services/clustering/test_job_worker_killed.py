"""A re-clustering job whose worker is SIGKILLed mid-run: the round loop's reaper queues it
again and the next worker finishes it, once; the dead run left nothing behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.clustering.jobs import OPERATOR, requeue_stale_jobs, submit_job
from tessera import db, procs
from tessera.config import Settings
from tessera.events import AGGREGATION_QUEUE
from tessera.models import Clustering, ClusteringJob, JobState
from tessera.stack import WORKER_APP
from tests.services.clustering.helpers import enrol_many
from tests.services.clustering.synthetic import directions, scatter
from tests.worker_processes import WorkerProcesses

pytestmark = pytest.mark.xdist_group("timed")

STALE_S = 2.0
DEVICES = 20_000  # MiniBatchKMeans for k = 2..8: seconds of work, time to kill the worker


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcesses]:
    fast = settings.model_copy(update={"task_stale_s": STALE_S, "worker_metrics_port": 0})
    pool = WorkerProcesses(fast, tmp_path, app=WORKER_APP)
    yield pool
    pool.close()


def _job(session: Session, job_id: int) -> ClusteringJob:
    session.expire_all()
    return session.get_one(ClusteringJob, job_id)


@pytest.mark.slow
def test_a_job_held_by_a_killed_worker_is_finished_once_by_the_next(
    settings: Settings, session: Session, workers: WorkerProcesses
) -> None:
    vectors, _ = scatter(directions(4, seed=5), [DEVICES // 4] * 4, seed=6)
    enrol_many(session, vectors, prefix="edge")
    sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))
    relay = workers.relay(AGGREGATION_QUEUE)
    job_id = submit_job(
        session=session, celery=workers.celery, params={"seed": 0}, trigger=OPERATOR
    ).id
    procs.wait_until(
        lambda: _job(session, job_id).state == JobState.RUNNING,
        timeout=60,
        what="the worker taking the job",
        interval=0.01,
    )
    time.sleep(0.5)  # into the clustering itself
    killed_at = relay.kill_first()
    held = _job(session, job_id)
    held_state, held_attempts = held.state, held.attempts
    up_at = relay.bring_standby()
    requeued: list[int] = []

    def finished() -> bool:
        requeued.extend(
            requeue_stale_jobs(sessions=sessions, celery=workers.celery, stale_s=STALE_S)[
                "requeued"
            ]
        )
        return _job(session, job_id).state in (JobState.SUCCEEDED, JobState.FAILED)

    procs.wait_until(
        finished, timeout=120, what="the job finished by the next worker", interval=0.2
    )
    done_at = time.monotonic()
    print(
        f"job finished {done_at - up_at:.1f} s after the next worker joined the queue "
        f"({done_at - killed_at:.1f} s after the kill; stale after {STALE_S:g} s)"
    )

    assert held_state == JobState.RUNNING and held_attempts == 1
    assert requeued == [job_id]
    job = _job(session, job_id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 2, job.error
    made = session.scalars(select(Clustering)).all()
    assert [(c.id, c.version) for c in made] == [(job.clustering_id, 1)]
    assert made[0].metrics["n_devices"] == DEVICES and made[0].metrics["k"] == 4
