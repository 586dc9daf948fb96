"""An inference worker SIGKILLed mid-job: the inference API's loop queues the job again, the
next worker finishes it within seconds of being up, and its event stream ends with the final
event (not after Redis's 35-minute visibility timeout). Only its pool process killed: the
redelivered message puts the job back in the queue at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.inference.api.main import create_app
from tessera import procs
from tessera.config import Settings
from tessera.events import INFERENCE_QUEUE
from tessera.lora import LoraSpec, random_adapter
from tessera.models import GenerationJob, JobState, Role
from tessera.stack import INFERENCE_WORKER_APP
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.inference.helpers import embeds_b64, make_client, publish, tokens
from tests.services.inference.test_end_to_end import sse_events
from tests.worker_processes import WorkerProcesses, quick_to_recover

# A wall-clock bound: under pytest-xdist these modules run one at a time, on one worker.
pytestmark = pytest.mark.xdist_group("timed")

STALE_S = 2.0
IMAGES = 8


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return quick_to_recover(settings, stale_s=STALE_S)


@pytest.fixture
def workers(fast: Settings, tmp_path: Path) -> Iterator[WorkerProcesses]:
    pool = WorkerProcesses(fast, tmp_path, app=INFERENCE_WORKER_APP)
    yield pool
    pool.close()


def _job(session: Session, job_id: str) -> GenerationJob:
    session.expire_all()
    return session.get_one(GenerationJob, job_id)


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_finishes_on_the_next_and_its_stream_ends(
    fast: Settings,
    session: Session,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    spec: LoraSpec,
    workers: WorkerProcesses,
) -> None:
    publish(sessions, store, "cluster:0", random_adapter(spec, 4, 4.0, seed=0))
    _, token = make_client(session, fast, Role.GENERATOR)
    relay = workers.relay(INFERENCE_QUEUE)
    with TestClient(create_app(fast)) as api:  # the stalled-job loop, every 0.2 s
        job_id = _submit(api, session, token)
        killed_at = relay.kill_first()
        killed_state = _job(session, job_id).state
        events, follower = _follow(api, job_id, token)
        up_at = relay.bring_standby()
        procs.wait_until(
            lambda: _job(session, job_id).attempts == 2, timeout=120, what="the job run again"
        )
        rerun_at = time.monotonic()  # recovered: the next worker runs it (the run takes a while)
        done_at, stream_open, view = _finished(api, session, job_id, token, follower)

    job = _job(session, job_id)
    print(
        f"job running again {rerun_at - up_at:.1f} s after the next worker joined the queue, "
        f"finished {done_at - killed_at:.1f} s after the kill"
    )
    assert killed_state == JobState.RUNNING
    assert job.attempts == 2  # the killed run, then the next worker's
    assert not stream_open
    assert events and events[-1][0] == "succeeded"
    assert len(view["result"]["images"]) == IMAGES
    assert rerun_at - up_at < 4 * STALE_S + 30


@pytest.mark.slow
def test_a_job_whose_pool_process_is_killed_is_run_again_by_its_redelivered_message(
    fast: Settings,
    session: Session,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    spec: LoraSpec,
    workers: WorkerProcesses,
) -> None:
    # The stalled-job loop waits ten minutes: only the redelivered message can bring it back.
    patient = fast.model_copy(update={"task_stale_s": 600.0})
    publish(sessions, store, "cluster:0", random_adapter(spec, 4, 4.0, seed=0))
    _, token = make_client(session, patient, Role.GENERATOR)
    worker, node = workers.spawn(INFERENCE_QUEUE)
    workers.wait_ready(worker, node)
    with TestClient(create_app(patient)) as api:
        job_id = _submit(api, session, token)
        (pool,) = _children(worker.pid)
        os.kill(pool, signal.SIGKILL)  # the pool process only (out of memory, say)
        killed_at = time.monotonic()
        events, follower = _follow(api, job_id, token)
        done_at, stream_open, view = _finished(api, session, job_id, token, follower)

    job = _job(session, job_id)
    print(f"job finished {done_at - killed_at:.1f} s after its pool process was killed")
    assert job.attempts == 2  # the killed run, then its redelivered message's
    assert not stream_open
    assert events and events[-1][0] == "succeeded"
    assert len(view["result"]["images"]) == IMAGES
    assert done_at - killed_at < 120  # far below TESSERA_TASK_STALE_S


def _submit(api: TestClient, session: Session, token: str) -> str:
    """A job of 8 images and 100 steps (long enough to be killed mid-way on a busy machine),
    once it runs."""
    body = {
        "prompt_embeds": embeds_b64(tokens()),
        "adapters": [{"adapter": "cluster:0", "weight": 1.0}],
        "steps": 100,
        "num_images": IMAGES,
        "seed": 3,
    }
    submitted = api.post("/v1/generations", json=body, headers=bearer(token))
    assert submitted.status_code == 202, submitted.text
    job_id: str = submitted.json()["id"]
    procs.wait_until(
        lambda: _job(session, job_id).progress_step >= 1,
        timeout=120,
        what="the job running",
        interval=0.01,
    )
    return job_id


def _follow(
    api: TestClient, job_id: str, token: str
) -> tuple[list[tuple[str, dict[str, Any]]], threading.Thread]:
    """The job's events, filled by a thread that follows its stream to the end."""
    events: list[tuple[str, dict[str, Any]]] = []

    def follow() -> None:
        url = f"/v1/generations/{job_id}/events"
        with api.stream("GET", url, headers=bearer(token)) as stream:
            events.extend(sse_events(stream.iter_lines()))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    return events, follower


def _finished(
    api: TestClient, session: Session, job_id: str, token: str, follower: threading.Thread
) -> tuple[float, bool, dict[str, Any]]:
    """When the job succeeded, whether its stream was still open 30 s later, and its view."""
    procs.wait_until(
        lambda: _job(session, job_id).state == JobState.SUCCEEDED,
        timeout=180,
        what="the job finished",
        interval=0.05,
    )
    done_at = time.monotonic()
    follower.join(30)
    view = api.get(f"/v1/generations/{job_id}", headers=bearer(token)).json()
    return done_at, follower.is_alive(), view


def _children(pid: int) -> list[int]:
    """The process's child processes."""
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]
