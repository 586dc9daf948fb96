"""Queued jobs with the same steps and guidance run as one UNet batch, whatever their mixes, and
each still gets what it would alone."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from services.inference.api.stalled import requeue_stalled_jobs
from services.inference.worker.runner import JobRuntime, run_generation, run_next
from services.worker.publishing import PublishedVersion
from tessera.config import Settings
from tessera.events import generation_channel
from tessera.models import GenerationJob, JobState, utcnow
from tessera.queue import make_celery
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.inference.helpers import (
    drain,
    embeds_b64,
    images_of,
    submit,
    tokens,
)

A = [{"adapter": "cluster:0", "weight": 1.0}]
B = [{"adapter": "cluster:1", "weight": 1.0}]


@pytest.fixture
def runtime(runtime: JobRuntime) -> JobRuntime:
    """The package's runtime, batching up to 8 images."""
    return dataclasses.replace(runtime, max_batch_images=8)


def state_of(sessions: sessionmaker[Session], job_id: str) -> tuple[JobState, str | None]:
    with sessions() as session:
        job = session.get(GenerationJob, job_id)
        assert job is not None
        return job.state, job.batch_leader


def test_queued_jobs_run_together_whatever_their_mixes_and_each_equals_its_run_alone(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    token = generator[1]
    requests: dict[str, dict[str, Any]] = {
        "first": {"adapters": A, "num_images": 2, "seed": 1},
        "negative": {
            "adapters": A,
            "num_images": 1,
            "seed": 2,
            "prompt_embeds": embeds_b64(tokens(6)),
            "negative_embeds": embeds_b64(tokens(9)),
        },
        "third": {
            "adapters": A,
            "num_images": 3,
            "seed": 3,
            "prompt_embeds": embeds_b64(tokens(7)),
        },
        "other mix": {"adapters": B, "num_images": 1, "seed": 4},
        # Not in the batch: other steps, a split job.
        "other steps": {"adapters": A, "num_images": 1, "steps": 8},
        "split": {"adapters": A, "num_images": 1, "stop_at_step": 3},
    }
    ids = {name: submit(api, token, **fields) for name, fields in requests.items()}
    pubsub = broker.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(generation_channel(ids["negative"]))

    summary = run_generation(ids["first"], runtime=runtime)
    followers_message = run_generation(ids["negative"], runtime=runtime)

    batch = [ids["first"], ids["negative"], ids["third"], ids["other mix"]]
    assert summary["batch"] == batch
    assert followers_message == {"id": ids["negative"], "state": "succeeded", "skipped": True}
    for name in ("other steps", "split"):
        assert state_of(sessions, ids[name]) == (JobState.QUEUED, None), name
    with sessions() as session:
        results = [session.get(GenerationJob, job_id).result for job_id in batch]  # type: ignore[union-attr]
    together = {"leader": ids["first"], "jobs": 4, "images": 7, "mixes": 2}
    assert all(r["batch"] == together for r in results)
    assert [len(r["images"]) for r in results] == [2, 1, 3, 1]
    assert [r["adapters"][0]["adapter"] for r in results] == ["cluster:0"] * 3 + ["cluster:1"]
    assert [(e["state"], e["step"]) for e in drain(pubsub)] == [
        ("running", 0),
        *[("running", i) for i in range(1, 7)],
        ("succeeded", 6),
    ]
    # The same requests run one by one give the same images, up to float rounding: the
    # per-sample LoRA products round differently from one job's, and these random prompts
    # under strong random adapters amplify rounding on a few pixels. Measured: perturbing the
    # base's weights by 1e-7 (float32 rounding) moves "third" by up to 6 levels on at most 9 of
    # its 9,216 values (mean 0.06-0.10), the others by 1 level; run alone against batched, at
    # most 1 level alone and 6 in a full two-worker run. So: a mean under 0.2 level and under
    # 0.5% of values off by more than 2, which a wrong mix or a swapped image would break many
    # times over. A random negative prompt (far from any caption) steers guidance hard enough
    # that rounding grows over the steps (measured: mean 1.6-4.9 levels), bounded at 8.
    alone = dataclasses.replace(runtime, max_batch_images=1)
    for name in ("first", "negative", "third", "other mix"):
        again = submit(api, token, **requests[name])
        assert run_generation(again, runtime=alone)["batch"] == [again]
        together, single = images_of(store, sessions, ids[name]), images_of(store, sessions, again)
        diff = np.abs(together.astype(int) - single.astype(int))
        if name == "negative":
            assert diff.mean() <= 8, name
        else:
            assert diff.mean() <= 0.2 and (diff > 2).mean() <= 0.005, (name, diff.max())
    assert store.list_keys("inputs/") != []  # the jobs left queued keep their inputs


def test_a_batch_takes_jobs_only_while_their_images_fit(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    sessions: sessionmaker[Session],
) -> None:
    small = dataclasses.replace(runtime, max_batch_images=4)
    ids = [submit(api, generator[1], adapters=A, num_images=n, steps=3) for n in (2, 3, 2)]

    summary = run_generation(ids[0], runtime=small)

    assert summary["batch"] == [ids[0], ids[2]]
    assert state_of(sessions, ids[1]) == (JobState.QUEUED, None)
    assert run_generation(ids[1], runtime=small)["batch"] == [ids[1]]


def test_a_batch_whose_worker_died_goes_back_to_the_queue_and_runs_again(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    settings: Settings,
    sessions: sessionmaker[Session],
) -> None:
    leader, follower = (submit(api, generator[1], adapters=A, steps=3) for _ in range(2))
    with sessions() as session:  # the leader's worker took both, then died
        assert crud.claim_job(session=session, job_id=leader, total_steps=3)
        assert crud.join_batch(session=session, job_id=follower, leader_id=leader, total_steps=3)
    celery = make_celery(settings)

    own_message = run_generation(follower, runtime=runtime)  # taken: its message runs nothing
    still = state_of(sessions, follower)
    loop = requeue_stalled_jobs(
        sessions=sessions,
        celery=celery,
        redis_client=None,
        stale_s=60,
        now=utcnow() + timedelta(minutes=2),
    )
    celery.close()
    queued = [state_of(sessions, job_id) for job_id in (leader, follower)]
    again = run_next(runtime=runtime)

    assert own_message == {"id": follower, "state": "running", "skipped": True}
    assert still == (JobState.RUNNING, leader)
    assert loop == {"requeued": [leader, follower], "failed": []}
    assert queued == [(JobState.QUEUED, None), (JobState.QUEUED, None)]
    assert again["batch"] == [leader, follower]
    assert state_of(sessions, follower) == (JobState.SUCCEEDED, leader)


def test_when_a_batch_fails_every_job_in_it_fails_with_the_reason(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    sessions: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    ids = [submit(api, generator[1], adapters=B, steps=3) for _ in range(2)]
    store.delete(styles["cluster:1"].object_key)

    with pytest.raises(Exception, match="no object"):
        run_generation(ids[0], runtime=runtime)

    for job_id in ids:
        view = api.get(f"/v1/generations/{job_id}", headers=bearer(generator[1])).json()
        assert view["state"] == "failed" and "ObjectNotFoundError" in view["error"], job_id
    assert store.list_keys("inputs/") == []  # neither input is kept
