"""Re-clustering off the request path: 202 and a job that the operator polls (API and CLI),
failures with their reason, jobs whose worker died queued again, drift, O(k) assignment."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.clustering import crud, jobs
from services.clustering.jobs import (
    MAX_JOB_RUNS,
    ActiveJobError,
    queue_drift_job,
    requeue_stale_jobs,
    submit_job,
)
from services.clustering.main import create_app
from tessera import db
from tessera.config import Settings
from tessera.events import AGGREGATION_QUEUE, TASK_RECLUSTER
from tessera.models import ClusteringJob, JobState, Role, utcnow
from tessera.queue import make_celery
from tessera.sdk.operator import recluster_and_wait
from tessera.stack import WORKER_APP
from tests.helpers import bearer, run_cli, stack_env
from tests.services.aggregator.helpers import queued_tasks
from tests.services.clustering.helpers import (
    Member,
    add_client,
    add_device,
    operator,
    run_here,
)
from tests.services.clustering.synthetic import DIM
from tests.serving import served
from tests.worker_processes import WorkerProcesses

STALE_S = 60.0


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url or "")
    yield client
    client.close()


def _job(session: Session, job_id: int) -> ClusteringJob:
    session.expire_all()
    return session.get_one(ClusteringJob, job_id)


def test_reclustering_answers_202_and_the_job_is_polled_until_it_succeeds(
    clustering_api: TestClient,
    settings: Settings,
    fleet: list[Member],
    broker: redis.Redis,
) -> None:
    queued = clustering_api.post("/v1/clusterings", json={"k": 3}, headers=operator(settings))
    job_id = queued.json()["id"]
    polled = clustering_api.get(queued.headers["location"], headers=operator(settings))
    second = clustering_api.post("/v1/clusterings", json={}, headers=operator(settings))
    no_clustering_yet = clustering_api.get("/v1/clusterings/current", headers=operator(settings))
    ran = run_here(settings, job_id)
    again = run_here(settings, job_id)  # a redelivered message
    done = clustering_api.get(f"/v1/clustering-jobs/{job_id}", headers=operator(settings))
    listed = clustering_api.get("/v1/clustering-jobs", headers=operator(settings))
    current = clustering_api.get("/v1/clusterings/current", headers=operator(settings))

    assert queued.status_code == 202, queued.text
    assert queued.headers["location"] == f"/v1/clustering-jobs/{job_id}"
    assert queued.json()["state"] == "queued" and queued.json()["trigger"] == "operator"
    assert polled.json()["state"] == "queued"
    assert second.status_code == 409
    assert f"re-clustering job {job_id} is already queued" in second.json()["detail"]
    assert no_clustering_yet.status_code == 404
    assert queued_tasks(broker) == [(TASK_RECLUSTER, [job_id])]  # only the accepted one
    assert ran["state"] == "succeeded" and again["state"] == "skipped"
    body = done.json()
    assert body["state"] == "succeeded" and body["clustering_version"] == 1
    assert body["attempts"] == 1 and body["error"] is None and body["finished_at"]
    assert [job["id"] for job in listed.json()] == [job_id]
    assert current.json()["version"] == 1 and current.json()["metrics"]["k"] == 3
    sizes = sorted(c["size"] for c in current.json()["clusters"])
    assert sizes == [4, 4, 4]


def test_a_job_the_devices_refuse_fails_with_its_reason_and_stores_nothing(
    clustering_api: TestClient,
    settings: Settings,
    session: Session,
    fleet: list[Member],
) -> None:
    queued = clustering_api.post("/v1/clusterings", json={"k": 13}, headers=operator(settings))
    ran = run_here(settings, queued.json()["id"])
    failed = clustering_api.get(queued.headers["location"], headers=operator(settings)).json()
    next_one = clustering_api.post("/v1/clusterings", json={"k": 3}, headers=operator(settings))

    assert queued.status_code == 202
    assert ran["state"] == "failed"
    assert failed["state"] == "failed" and failed["finished_at"]
    assert failed["error"] == "k=13 exceeds the number of vectors n=12"
    assert crud.current_clustering(session=session) is None
    assert next_one.status_code == 202  # a failed job does not block the next


def test_only_operators_queue_and_read_jobs(
    clustering_api: TestClient,
    settings: Settings,
    session: Session,
    fleet: list[Member],
) -> None:
    generator = add_client(session, settings, "gen", Role.GENERATOR)
    queued = clustering_api.post("/v1/clusterings", json={}, headers=operator(settings))
    path = queued.headers["location"]

    for token in (fleet[0].token, generator.token):
        for method, url in (
            ("post", "/v1/clusterings"),
            ("get", path),
            ("get", "/v1/clustering-jobs"),
        ):
            answer = clustering_api.request(method, url, json={}, headers=bearer(token))
            assert answer.status_code == 403, (method, url, answer.text)
    assert clustering_api.get(path).status_code == 401
    unknown = clustering_api.get("/v1/clustering-jobs/999999", headers=operator(settings))
    assert unknown.status_code == 404 and "999999" not in unknown.text
    assert (
        clustering_api.get("/v1/clustering-jobs/0", headers=operator(settings)).status_code == 422
    )


def test_a_job_whose_worker_died_is_queued_again_then_failed(
    clustering_api: TestClient,
    settings: Settings,
    session: Session,
    fleet: list[Member],
    broker: redis.Redis,
) -> None:
    job_id = clustering_api.post("/v1/clusterings", json={}, headers=operator(settings)).json()[
        "id"
    ]
    sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))
    celery = make_celery(settings)
    job = _job(session, job_id)
    job.state, job.attempts, job.heartbeat_at = JobState.RUNNING, 1, utcnow()  # a worker took it
    session.commit()
    soon, later = utcnow() + timedelta(seconds=30), utcnow() + timedelta(seconds=61)

    fresh = requeue_stale_jobs(sessions=sessions, celery=celery, stale_s=STALE_S, now=soon)
    requeued = requeue_stale_jobs(sessions=sessions, celery=celery, stale_s=STALE_S, now=later)
    state_then = _job(session, job_id).state
    rerun = run_here(settings, job_id)
    after = _job(session, job_id)
    # A second job whose every run lost its worker is given up, with the reason.
    dying = ClusteringJob(
        state=JobState.RUNNING, trigger="operator", params={}, attempts=MAX_JOB_RUNS
    )
    session.add(dying)
    session.commit()
    given_up = requeue_stale_jobs(
        sessions=sessions, celery=celery, stale_s=STALE_S, now=later + timedelta(seconds=61)
    )

    assert fresh == {"requeued": [], "failed": []}
    assert requeued == {"requeued": [job_id], "failed": []}
    assert state_then == JobState.QUEUED
    assert rerun["state"] == "succeeded"
    assert after.state == JobState.SUCCEEDED and after.attempts == 2
    assert queued_tasks(broker) == [(TASK_RECLUSTER, [job_id])] * 2  # queued, queued again
    assert given_up == {"requeued": [], "failed": [dying.id]}
    failed = _job(session, dying.id)
    assert failed.state == JobState.FAILED
    assert failed.error == "re-clustering started 3 times and its worker stopped each time"


def test_drift_queues_one_reclustering_per_clustering_version(
    clustering_api: TestClient,
    settings: Settings,
    session: Session,
    fleet: list[Member],
    broker: redis.Redis,
) -> None:
    sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))
    celery = make_celery(settings)

    def drift() -> int | None:
        return queue_drift_job(sessions=sessions, celery=celery, share_limit=0.25, similarity=0.5)

    first = clustering_api.post("/v1/clusterings", json={"k": 3}, headers=operator(settings))
    run_here(settings, first.json()["id"])
    fresh = drift()
    # Six devices with a new task, far from every centroid, join: 6 of 18 are far.
    newcomers = [add_device(session, settings, f"new-{i}", -1, seed=500 + i) for i in range(6)]
    for member in newcomers:
        assigned = clustering_api.post(
            "/v1/assignments", json={"client_id": member.id}, headers=operator(settings)
        )
        assert assigned.status_code == 200 and assigned.json()["similarity"] < 0.5
    queued = drift()
    while_queued = drift()
    assert queued is not None
    ran = run_here(settings, queued)
    after = drift()  # the new version has the newcomers in a cluster of their own
    job = _job(session, queued)
    off = queue_drift_job(sessions=sessions, celery=celery, share_limit=0.0, similarity=0.5)

    assert fresh is None
    assert while_queued is None
    assert job.trigger == "drift" and job.base_version == 1 and job.params["k"] == 3
    assert ran["state"] == "succeeded" and ran["version"] == 2
    assert after is None and off is None
    current = crud.require_current_clustering(session=session)
    assert current.metrics["far_share"] == 0.0 and current.metrics["n_devices"] == 18


def test_two_processes_queueing_at_once_leave_one_active_job(
    settings: Settings, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two aggregator replicas' round loops both pass the 'no active job' check before either
    commits: the database (migration 0008) keeps one, and the other caller is told which."""
    celery = make_celery(settings)
    sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))
    real_active_job = jobs.active_job
    checks: list[int] = []

    def not_yet_committed(*, session: Session) -> ClusteringJob | None:
        checks.append(1)  # the other replica's row is invisible at the first check
        return None if len(checks) == 1 else real_active_job(session=session)

    with sessions() as first, sessions() as second:
        winner = submit_job(session=first, celery=celery, params={"k": 2}, trigger="drift")
        monkeypatch.setattr(jobs, "active_job", not_yet_committed)
        with pytest.raises(ActiveJobError, match=f"job {winner.id} is already queued"):
            submit_job(session=second, celery=celery, params={"k": 3}, trigger="drift")
        monkeypatch.undo()
        second.add(ClusteringJob(state=JobState.RUNNING, trigger="operator", params={}))
        with pytest.raises(IntegrityError):
            second.commit()
        second.rollback()
        winner.state = JobState.SUCCEEDED  # once over, the next one may be queued
        first.commit()
        after = submit_job(session=second, celery=celery, params={"k": 3}, trigger="operator")

    active = session.scalars(
        select(ClusteringJob.id).where(ClusteringJob.state.in_(["queued", "running"]))
    ).all()
    assert active == [after.id]


def test_the_first_assignment_over_too_many_devices_queues_a_job_instead(
    settings: Settings, session: Session, fleet: list[Member], broker: redis.Redis
) -> None:
    small = settings.model_copy(update={"clustering_large_n": 10})  # the fleet has 12
    with TestClient(create_app(small)) as api:

        def assign(member: Member) -> httpx.Response:
            return api.post(
                "/v1/assignments", json={"client_id": member.id}, headers=operator(settings)
            )

        first, second = assign(fleet[0]), assign(fleet[1])
        job = session.scalars(select(ClusteringJob)).one()
        nothing_yet = crud.current_clustering(session=session)
        ran = run_here(small, job.id)
        after = assign(fleet[0])

    assert first.status_code == second.status_code == 409
    detail = first.json()["detail"]
    assert "no clustering yet, and 12 devices are too many to cluster within a request" in detail
    assert f"re-clustering job {job.id} is queued" in detail
    assert f"re-clustering job {job.id} is queued" in second.json()["detail"]  # the same job
    assert job.trigger == "assignment" and nothing_yet is None
    assert queued_tasks(broker) == [(TASK_RECLUSTER, [job.id])]
    assert ran["state"] == "succeeded"
    assert after.status_code == 200 and after.json()["clustering_version"] == 1


def test_assigning_a_device_reads_only_its_vectors_and_the_k_centroids(
    clustering_api: TestClient, settings: Settings, session: Session
) -> None:
    """O(k): the same statements, each bound to the device or the clustering, whatever n."""
    engine = clustering_api.app.state.resources.engine  # type: ignore[attr-defined]
    statements: list[str] = []

    def record(_conn, _cursor, statement, _parameters, _context, _many) -> None:
        statements.append(statement)

    def assign(member: Member) -> list[str]:
        statements.clear()
        event.listen(engine, "before_cursor_execute", record)
        try:
            answer = clustering_api.post(
                "/v1/assignments", json={"client_id": member.id}, headers=operator(settings)
            )
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert answer.status_code == 200, answer.text
        return list(statements)

    devices = [add_device(session, settings, f"edge-{i}", i % 3, seed=i) for i in range(6)]
    run_here(
        settings,
        clustering_api.post("/v1/clusterings", json={"k": 3}, headers=operator(settings)).json()[
            "id"
        ],
    )
    small = assign(add_device(session, settings, "late-small", 1, seed=900))
    for i in range(300):
        add_device(session, settings, f"more-{i}", i % 3, seed=1000 + i)
    large = assign(add_device(session, settings, "late-large", 2, seed=901))

    assert len(devices) == 6
    assert large == small
    embedding_reads = [s for s in large if "FROM task_embeddings" in s]
    assert embedding_reads and all("task_embeddings.client_id =" in s for s in embedding_reads)
    assert not any("FROM assignments" in s and "client_id =" not in s for s in large)


@pytest.mark.slow
def test_a_real_worker_runs_the_cli_job_and_one_whose_worker_died(
    settings: Settings,
    session: Session,
    fleet: list[Member],
    tmp_path: Path,
) -> None:
    """`tessera cluster run --follow` against the served API and a Celery worker, and the
    simulator's `recluster_and_wait`; then a job left running by a dead worker is queued
    again by the reaper and run by the live worker."""
    pool = WorkerProcesses(
        settings.model_copy(update={"worker_metrics_port": 0}), tmp_path, app=WORKER_APP
    )
    try:
        process, node = pool.spawn(AGGREGATION_QUEUE)
        pool.wait_ready(process, node)
        with served(create_app(settings)) as url:
            env = {
                **stack_env(tmp_path / "cli"),
                "TESSERA_CLUSTERING_URL": url,
                "TESSERA_OPERATOR_TOKEN": settings.operator_token.get_secret_value(),
            }
            followed = run_cli(
                "cluster", "run", "--k", "3", "--follow", "--timeout-s", "120", env=env
            )
            refused = run_cli(
                "cluster", "run", "--k", "13", "--follow", "--timeout-s", "120", env=env
            )
            failed_id = session.scalars(select(func.max(ClusteringJob.id))).one()
            shown = run_cli("cluster", "job", str(failed_id), env=env)
            with httpx.Client(base_url=url, headers=operator(settings)) as http:
                # A job already queued (as the round loop queues one on drift): the
                # simulator's call follows it, then queues and returns its own.
                ahead = http.post("/v1/clusterings", json={"k": 2}).json()
                waited = recluster_and_wait(http, {"k": 3}, timeout_s=120)
        dead = ClusteringJob(
            state=JobState.RUNNING, trigger="operator", params={"k": 2}, attempts=1
        )
        session.add(dead)
        session.commit()
        sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))
        later = utcnow() + timedelta(seconds=STALE_S + 1)
        requeued = requeue_stale_jobs(
            sessions=sessions, celery=pool.celery, stale_s=STALE_S, now=later
        )
        deadline = time.monotonic() + 120
        while _job(session, dead.id).state != JobState.SUCCEEDED and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        pool.close()

    assert followed.returncode == 0, followed.stderr
    done_id = failed_id - 1  # ids are not reset between tests on PostgreSQL
    assert f"job {done_id} queued" in followed.stderr
    assert f"job {done_id} succeeded (version 1)" in followed.stderr
    assert '"clustering_version": 1' in followed.stdout
    assert refused.returncode != 0
    assert f"job {failed_id} failed: k=13 exceeds the number of vectors n=12" in refused.stderr
    assert shown.returncode == 0 and '"error": "k=13 exceeds' in shown.stdout
    assert requeued["requeued"] == [dead.id]
    job = _job(session, dead.id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 2
    versions = session.scalars(select(ClusteringJob.clustering_id)).all()
    assert len([v for v in versions if v is not None]) == 4
    assert _job(session, ahead["id"]).state == JobState.SUCCEEDED
    assert waited["version"] == 3 and len(waited["clusters"]) == 3


def test_directions_fill_one_matrix_and_grow_it_for_devices_counted_late(
    session: Session, fleet: list[Member], monkeypatch: pytest.MonkeyPatch
) -> None:
    exact_ids, exact = crud.device_directions(session=session)
    # Devices that uploaded between the count and the read: the matrix doubles until all fit.
    monkeypatch.setattr(crud, "count_devices_with_vectors", lambda *, session: 1)
    late_ids, late = crud.device_directions(session=session)

    assert exact_ids == late_ids == sorted(member.id for member in fleet)
    assert exact.shape == late.shape == (12, DIM)
    assert np.array_equal(exact, late)
    assert np.allclose(np.linalg.norm(exact, axis=1), 1.0)
