"""Helpers of the inference tests: clients, published adapters, encoded prompts, the queue."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import redis
import torch
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient
from safetensors.torch import save
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.inference.worker import runtime as inference_runtime
from services.inference.worker.cache import AdapterCache
from services.inference.worker.runner import JobRuntime
from services.worker.publishing import PublishedVersion, ToPublish, publish_version
from tessera.config import Settings
from tessera.events import INFERENCE_QUEUE
from tessera.federation import CLUSTER_PREFIX, GLOBAL_ADAPTER
from tessera.lora import LoraAdapter
from tessera.model.base import BaseModel
from tessera.models import AdapterKind, Client, GenerationJob, JobState, Role, Round, RoundState
from tessera.queue import make_celery
from tessera.storage import ObjectStore
from tessera.tokens import hash_token, new_token
from tests.helpers import bearer


def make_client(
    session: Session, settings: Settings, role: Role, name: str = ""
) -> tuple[int, str]:
    """An enrolled client of `role`: (id, bearer token)."""
    token = new_token()
    client = Client(
        name=name or f"{role.value}-{uuid.uuid4().hex[:8]}",
        role=role,
        token_hash=hash_token(token, secret=settings.token_secret.get_secret_value()),
    )
    session.add(client)
    session.commit()
    return client.id, token


def publish(
    sessions: sessionmaker[Session], store: ObjectStore, name: str, adapter: LoraAdapter
) -> PublishedVersion:
    """Publish `adapter` as the next version of `name`, as the worker does (its own round)."""
    with sessions() as session:
        number = (session.scalar(select(func.max(Round.number))) or 0) + 1
        round_row = Round(number=number, state=RoundState.PUBLISHED)
        session.add(round_row)
        session.commit()
        round_id = round_row.id
    label = int(name.removeprefix(CLUSTER_PREFIX)) if name.startswith(CLUSTER_PREFIX) else None
    kind = AdapterKind.GLOBAL if name == GLOBAL_ADAPTER else AdapterKind.CLUSTER
    output = ToPublish(
        name=name, kind=kind, cluster_label=label, adapter=adapter, metrics={"updates": 1}
    )
    return publish_version(output, round_id=round_id, method="test", sessions=sessions, store=store)


def announce(client: redis.Redis, version: PublishedVersion) -> int:
    """Send the "adapter published" event of `version`; how many subscribers got it."""
    from tessera.events import adapter_published_channel

    event = version.event(round_id=0)
    return int(client.publish(adapter_published_channel(client), json.dumps(event)))  # type: ignore[arg-type]


def tokens(seed: int = 0, length: int = 16, width: int = 384) -> torch.Tensor:
    """Stand-in token embeddings [1, T, width] (float16), like an encoded prompt's scale."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, width, generator=generator).half()


def embeds_b64(tensor: torch.Tensor, name: str = "prompt_embeds") -> str:
    """`tensor` as a base64 safetensors file holding one tensor `name`."""
    return base64.b64encode(save({name: tensor.contiguous()})).decode()


def raw_b64(tensor: torch.Tensor) -> str:
    """`tensor` as base64 raw little-endian float16 values (embeds_format f16le)."""
    array = tensor.reshape(-1, tensor.shape[-1]).numpy().astype("<f2")
    return base64.b64encode(array.tobytes()).decode()


def queued_jobs(broker: redis.Redis) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message waiting on the inference queue, oldest first."""
    tasks = []
    raw_messages: list[bytes] = broker.lrange(INFERENCE_QUEUE, 0, -1)  # type: ignore[assignment]
    for raw in reversed(raw_messages):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], body[0]))
    return tasks


def job_rows(session: Session) -> int:
    session.expire_all()
    return session.scalar(select(func.count()).select_from(GenerationJob)) or 0


def png_array(data: bytes) -> np.ndarray:
    """A PNG file's pixels (H, W, 3) as uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def submit(api: TestClient, token: str, **fields: Any) -> str:
    body = {"prompt_embeds": embeds_b64(tokens(5)), "steps": 6, "seed": 3, **fields}
    response = api.post("/v1/generations", json=body, headers=bearer(token))
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def images_of(store: ObjectStore, sessions: sessionmaker[Session], job_id: str) -> np.ndarray:
    with sessions() as session:
        job = session.get(GenerationJob, job_id)
        assert job is not None and job.state is JobState.SUCCEEDED, job and job.error
        keys = job.result["images"]
    return np.stack([png_array(store.get_bytes(key)) for key in keys])


def drain(pubsub: Any, quiet_s: float = 0.5) -> list[dict[str, Any]]:
    """Every event waiting on a subscription (a None reply can be the subscribe confirmation)."""
    events = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=quiet_s)
        if message is not None:
            events.append(json.loads(message["data"]))
        elif events and events[-1]["state"] in ("succeeded", "failed"):
            break
    pubsub.close()
    return events


@contextmanager
def inference_worker(
    settings: Settings,
    base: BaseModel,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    max_batch_images: int = 1,
) -> Iterator[None]:
    """A Celery worker on the inference queue, in a thread, with this process's model."""
    resources_redis = redis.Redis.from_url(settings.redis_url or "")
    cache = AdapterCache(base=base, sessions=sessions, store=store, max_bytes=64 * 2**20)
    inference_runtime.use_runtime(
        JobRuntime(
            sessions=sessions,
            store=store,
            redis=resources_redis,
            base=base,
            cache=cache,
            max_batch_images=max_batch_images,
        )
    )
    import services.inference.worker.tasks  # noqa: F401 - registers the task with every app

    app = make_celery(settings, main="tessera-inference-test")
    try:
        with start_worker(
            app, pool="solo", perform_ping_check=False, queues=[INFERENCE_QUEUE], loglevel="WARNING"
        ):
            yield
    finally:
        inference_runtime.use_runtime(None)
        app.close()
        resources_redis.close()
