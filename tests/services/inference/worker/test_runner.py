"""The generation task's work, run in-process: images, progress, failure, split, isolation."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from services.inference.worker.runner import JobRuntime, run_generation
from services.worker.publishing import PublishedVersion
from tessera.events import generation_channel
from tessera.lora import adapter_from_bytes
from tessera.model.base import BaseModel
from tessera.model.generate import generate, latents_from_bytes
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.inference.helpers import (
    drain,
    images_of,
    png_array,
    submit,
    tokens,
)


def test_a_job_stores_png_images_and_reports_each_step(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    broker: redis.Redis,
    store: ObjectStore,
) -> None:
    mix = [{"adapter": "cluster:0", "weight": 0.5}, {"adapter": "cluster:1", "weight": 0.5}]
    job_id = submit(api, generator[1], adapters=mix, num_images=2)
    pubsub = broker.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(generation_channel(job_id))

    summary = run_generation(job_id, runtime=runtime)
    events = drain(pubsub)
    view = api.get(f"/v1/generations/{job_id}", headers=bearer(generator[1])).json()

    assert summary["state"] == "succeeded"
    assert [(e["state"], e["step"]) for e in events] == [
        ("running", 0),
        *[("running", i) for i in range(1, 7)],
        ("succeeded", 6),
    ]
    assert view["state"] == "succeeded"
    assert view["progress"] == {"step": 6, "total_steps": 6}
    assert view["result"]["latents_url"] is None
    pngs = [httpx.get(image["url"]) for image in view["result"]["images"]]
    assert [r.status_code for r in pngs] == [200, 200]
    arrays = [png_array(r.content) for r in pngs]
    assert all(a.shape == (32, 32, 3) for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])  # two images, two noises
    assert store.list_keys("inputs/") == []  # the encoded prompt is not kept


def test_a_job_runs_once_and_a_crashed_run_is_redone(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    sessions: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    job_id = submit(api, generator[1], adapters=[{"adapter": "cluster:0", "weight": 1.0}])
    with sessions() as session:  # a worker took it and died; the stalled-job loop put it back
        assert crud.claim_job(session=session, job_id=job_id, total_steps=6)
        assert crud.requeue_batch(session=session, leader_id=job_id) == [job_id]

    first = run_generation(job_id, runtime=runtime)
    image = images_of(store, sessions, job_id)
    again = run_generation(job_id, runtime=runtime)

    assert first["state"] == "succeeded"
    assert again == {"id": job_id, "state": "succeeded", "skipped": True}
    assert np.array_equal(images_of(store, sessions, job_id), image)


def test_a_job_whose_adapter_cannot_be_read_fails_with_the_reason(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    store: ObjectStore,
) -> None:
    job_id = submit(api, generator[1], adapters=[{"adapter": "cluster:1", "weight": 1.0}])
    store.delete(styles["cluster:1"].object_key)

    with pytest.raises(Exception, match="no object"):
        run_generation(job_id, runtime=runtime)
    view = api.get(f"/v1/generations/{job_id}", headers=bearer(generator[1])).json()

    assert view["state"] == "failed"
    assert "ObjectNotFoundError" in view["error"]
    assert view["result"] is None


def test_k_server_steps_then_the_rest_on_the_device_equal_one_full_run(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    base_model: BaseModel,
    store: ObjectStore,
) -> None:
    steps, k, guidance, seed = 8, 3, 3.0, 21
    job_id = submit(
        api,
        generator[1],
        adapters=[{"adapter": "cluster:0", "weight": 1.0}],
        steps=steps,
        stop_at_step=k,
        guidance=guidance,
        seed=seed,
        num_images=2,
    )

    run_generation(job_id, runtime=runtime)
    view = api.get(f"/v1/generations/{job_id}", headers=bearer(generator[1])).json()
    data = httpx.get(view["result"]["latents_url"]).content
    # What `tessera device finish` does with the file: read it, run the last steps.
    handoff = latents_from_bytes(data)
    adapter = adapter_from_bytes(store.get_bytes(styles["cluster:0"].object_key))
    prompt = tokens(5).float().expand(2, -1, -1)
    finished = generate(
        base_model,
        prompt,
        [(adapter, 1.0)],
        steps=handoff.steps,
        guidance=handoff.guidance,
        start_latents=handoff.latents,
        start_step=handoff.step,
        sampler=handoff.sampler,
    ).images
    full = generate(
        base_model, prompt, [(adapter, 1.0)], steps=steps, guidance=guidance, seed=seed
    ).images

    assert view["state"] == "succeeded" and view["result"]["images"] == []
    assert (handoff.step, handoff.steps, handoff.guidance) == (k, steps, guidance)
    state = view["result"]["scheduler_state"]
    assert state["step"] == k and state["steps"] == steps and len(state["timesteps"]) == steps
    assert finished is not None and full is not None
    torch.testing.assert_close(finished, full, atol=1e-5, rtol=0)


def test_concurrent_jobs_with_different_mixes_each_equal_the_job_run_alone(
    api: TestClient,
    generator: tuple[int, str],
    styles: dict[str, PublishedVersion],
    runtime: JobRuntime,
    sessions: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    mixes: dict[str, list[dict[str, Any]]] = {
        "base": [],
        "a": [{"adapter": "cluster:0", "weight": 1.0}],
        "b": [{"adapter": "cluster:1", "weight": 1.0}],
        "blend": [{"adapter": "cluster:0", "weight": 0.5}, {"adapter": "cluster:1", "weight": 0.5}],
        "blend again": [
            {"adapter": "cluster:1", "weight": 0.5},
            {"adapter": "cluster:0", "weight": 0.5},
        ],
    }
    alone = {}
    for name, mix in mixes.items():
        job_id = submit(api, generator[1], adapters=mix, steps=8)
        run_generation(job_id, runtime=runtime)
        alone[name] = images_of(store, sessions, job_id)
    loads_before = list(runtime.cache.stats.loads)
    concurrent_ids = {
        name: submit(api, generator[1], adapters=mix, steps=8) for name, mix in mixes.items()
    }
    errors: list[BaseException] = []
    start = threading.Barrier(len(mixes))

    def run(job_id: str) -> None:
        start.wait()
        try:
            run_generation(job_id, runtime=runtime)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in concurrent_ids.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    together = {name: images_of(store, sessions, i) for name, i in concurrent_ids.items()}

    assert errors == []
    for name in mixes:
        assert np.array_equal(together[name], alone[name]), name
    distinct = [alone[name].tobytes() for name in ("base", "a", "b", "blend")]
    assert len(set(distinct)) == 4  # each mix really changes the image
    assert runtime.cache.stats.loads == loads_before  # every adapter came from the cache
