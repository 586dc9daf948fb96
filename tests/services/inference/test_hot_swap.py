"""Hot swap across replicas: two inference worker processes, one "adapter published" event.

A job in flight when the new version is published finishes on the version it started with;
the next jobs, one on each process, use the new version, which each process had already
loaded on the event (nothing read from the object store at job time).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from tessera import procs
from tessera.config import Settings
from tessera.events import INFERENCE_QUEUE, adapter_published_channel
from tessera.lora import LoraSpec, adapter_from_bytes, random_adapter
from tessera.model.base import BaseModel
from tessera.model.generate import generate
from tessera.models import GenerationJob, JobState
from tessera.queue import make_celery
from tessera.stack import INFERENCE_WORKER_APP, worker_command
from tessera.storage import ObjectStore
from tests.helpers import bearer, metric_values
from tests.services.inference.helpers import announce, embeds_b64, png_array, publish, tokens

pytestmark = pytest.mark.slow

REPLICAS = 2


@pytest.fixture
def replicas(settings: Settings, tmp_path: Path, broker: redis.Redis) -> Iterator[list[str]]:
    """Two inference worker processes, each with its model loaded and subscribed to events;
    the URLs of their /metrics."""
    env = {
        **os.environ,
        **settings.as_env(),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        # One job per run: the test needs a job on each replica, not both in one batch.
        "TESSERA_INFERENCE_MAX_BATCH_IMAGES": "1",
    }
    logs = [tmp_path / f"inference-worker-{i}.log" for i in range(REPLICAS)]
    ports = procs.free_ports(REPLICAS)
    processes = [
        procs.spawn(
            worker_command(
                queues=[INFERENCE_QUEUE],
                concurrency=1,
                name=f"replica{i}-{uuid.uuid4().hex[:6]}",
                app=INFERENCE_WORKER_APP,
            ),
            log_path=log,
            env={
                **env,
                "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{i}"),
                "TESSERA_WORKER_METRICS_PORT": str(ports[i]),
            },
        )
        for i, log in enumerate(logs)
    ]
    app = make_celery(settings)
    try:
        for process, log in zip(processes, logs, strict=True):
            procs.wait_until(
                lambda: len(app.control.ping(timeout=0.5)) == REPLICAS,
                timeout=120,
                what="two inference workers",
                process=process,
                log_path=log,
            )
        # Each pool process subscribes once its model is loaded.
        procs.wait_until(
            lambda: _subscribers(broker) == REPLICAS,
            timeout=120,
            what="both workers' adapter-event subscriptions",
            process=processes[0],
            log_path=logs[0],
        )
        yield [f"http://127.0.0.1:{port}/metrics" for port in ports]
    finally:
        app.close()
        for process in processes:
            procs.stop(process)


def _subscribers(broker: redis.Redis) -> int:
    counts: Any = broker.pubsub_numsub(adapter_published_channel(broker))
    return int(counts[0][1])


def _job(sessions: sessionmaker[Session], job_id: str) -> GenerationJob:
    with sessions() as session:
        job = session.get(GenerationJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _wait(sessions: sessionmaker[Session], job_id: str, until: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(sessions, job_id)
        if until(job):
            return job
        assert job.state is not JobState.FAILED, job.error
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {job.state}")


def _reference(base: BaseModel, data: bytes, *, steps: int, seed: int, n: int) -> list[np.ndarray]:
    from tessera.data.tensors import to_uint8

    images = generate(
        base,
        tokens(7).float().expand(n, -1, -1),
        [(adapter_from_bytes(data), 1.0)],
        steps=steps,
        seed=seed,
    ).images
    assert images is not None
    return list(to_uint8(images))


def test_a_published_version_reaches_every_replica_without_touching_a_running_job(
    replicas: list[str],
    api: TestClient,
    generator: tuple[int, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    spec: LoraSpec,
    broker: redis.Redis,
    base_model: BaseModel,
) -> None:
    v1 = publish(sessions, store, "cluster:0", random_adapter(spec, 4, 4.0, seed=41, std=0.25))

    def submit(steps: int, seed: int, n: int = 1) -> str:
        body = {
            "prompt_embeds": embeds_b64(tokens(7)),
            "adapters": [{"adapter": "cluster:0", "weight": 1.0}],
            "steps": steps,
            "seed": seed,
            "num_images": n,
        }
        response = api.post("/v1/generations", json=body, headers=bearer(generator[1]))
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    long_job = submit(steps=100, seed=1, n=2)
    _wait(sessions, long_job, lambda job: job.progress_step >= 1)
    v2 = publish(sessions, store, "cluster:0", random_adapter(spec, 4, 4.0, seed=42, std=0.25))
    received = announce(broker, v2)
    step_at_swap = _job(sessions, long_job).progress_step
    finished_long = _wait(sessions, long_job, lambda job: job.state is JobState.SUCCEEDED)
    time.sleep(1.0)  # the idle replica has loaded v2 on the event by now
    next_jobs = [submit(steps=6, seed=10 + i) for i in range(REPLICAS)]
    finished_next = [
        _wait(sessions, j, lambda job: job.state is JobState.SUCCEEDED) for j in next_jobs
    ]

    assert received == REPLICAS
    assert step_at_swap < 100  # v2 was announced while the long job was running
    assert [a["version_id"] for a in finished_long.result["adapters"]] == [v1.version_id]
    long_images = [png_array(store.get_bytes(k)) for k in finished_long.result["images"]]
    expected_v1 = _reference(base_model, store.get_bytes(v1.object_key), steps=100, seed=1, n=2)
    for got, want in zip(long_images, expected_v1, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    workers = {job.result["worker"] for job in finished_next}
    assert len(workers) == REPLICAS, workers  # one job on each replica
    for i, job in enumerate(finished_next):
        assert [a["version_id"] for a in job.result["adapters"]] == [v2.version_id]
        assert job.result["loaded_from_store"] == []  # loaded on the event, before the job
        (image,) = [png_array(store.get_bytes(k)) for k in job.result["images"]]
        (want,) = _reference(base_model, store.get_bytes(v2.object_key), steps=6, seed=10 + i, n=1)
        assert np.abs(image.astype(int) - want.astype(int)).max() <= 1
    # Each replica's main process serves what its pool process recorded while running jobs.
    metrics = [metric_values(httpx.get(url, timeout=10).text) for url in replicas]
    assert sum(m["tessera_generation_seconds_count"] for m in metrics) == 1 + REPLICAS
    for replica in metrics:
        assert replica["tessera_adapter_cache_misses_total"] >= 1  # v2, read on the event
        assert replica["tessera_adapter_cache_bytes"] > 0
        assert "tessera_generation_queue_depth" in replica
