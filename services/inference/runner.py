"""Running one generation job: the work of the inference task, as a plain function.

Idempotent: a job already succeeded or failed is not run again; a job found running (its
worker died, the message came back) runs again from the start, with the same result, since
generation is deterministic given the seed. Progress goes to the job's row (throttled) and to
its Redis channel (every step); the database stays the source of truth.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy.exc
import torch
import urllib3
from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from services.inference.cache import AdapterCache
from services.inference.embeddings import input_from_bytes
from services.inference.mixes import PinnedAdapter
from services.inference.schemas import is_terminal
from tessera.data.tensors import to_uint8
from tessera.events import INFERENCE_QUEUE, generation_channel
from tessera.metrics import GENERATION_QUEUE_DEPTH, GENERATION_SECONDS
from tessera.model.base import BaseModel
from tessera.model.generate import GenerationResult, generate, latents_to_bytes
from tessera.models import GenerationJob, JobState, utcnow
from tessera.schemas import as_utc
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)

PROGRESS_DB_INTERVAL_S = 0.5
MAX_ERROR_CHARS = 2000
# Connection errors: the task retries them, and the job stays running until then.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError,
    urllib3.exceptions.HTTPError,
)


@dataclass
class JobRuntime:
    """What running a job needs: connections, the base model and the adapter cache."""

    sessions: sessionmaker[Session]
    store: ObjectStore
    redis: redis.Redis | None
    base: BaseModel
    cache: AdapterCache


def record_queue_depth(client: redis.Redis) -> None:
    """Set the queue-depth gauge from the length of the Celery queue's Redis list."""
    try:
        depth = client.llen(INFERENCE_QUEUE)
    except RedisError:
        return
    GENERATION_QUEUE_DEPTH.set(float(depth))  # type: ignore[arg-type]


def output_prefix(job_id: str) -> str:
    return f"generations/{job_id}/"


def run_generation(job_id: str, *, runtime: JobRuntime) -> dict[str, Any]:
    """Run job `job_id` to a terminal state; returns a summary (state, and the result)."""
    with runtime.sessions() as session:
        job = session.get(GenerationJob, job_id)
        if job is None:
            log.warning("generation job not found", extra={"job_id": job_id})
            return {"id": job_id, "state": "missing"}
        if is_terminal(job.state):
            return {"id": job_id, "state": job.state.value, "skipped": True}
        params, input_key, created_at = dict(job.params), job.input_key, job.created_at
    total = int(params.get("stop_at_step") or params["steps"])
    with runtime.sessions() as session:
        if not crud.claim_job(session=session, job_id=job_id, total_steps=total):
            return {"id": job_id, "state": "skipped", "skipped": True}
    reporter = ProgressReporter(job_id, runtime=runtime, total=total)
    reporter.publish(JobState.RUNNING, 0)
    try:
        result = _generate(job_id, params, input_key, runtime=runtime, progress=reporter.step)
    except TRANSIENT_ERRORS:
        raise
    except Exception as error:
        fail_job(
            job_id, f"{type(error).__name__}: {error}", runtime=runtime, step=reporter.last_step
        )
        raise
    with runtime.sessions() as session:
        finished = crud.finish_job(
            session=session,
            job_id=job_id,
            state=JobState.SUCCEEDED,
            result=result,
            progress_step=total,
        )
    reporter.publish(JobState.SUCCEEDED, total)
    _forget_input(runtime.store, input_key)
    GENERATION_SECONDS.observe((finished - as_utc(created_at)).total_seconds())
    log.info("generation succeeded", extra={"job_id": job_id, "mix": result["mix"]})
    return {"id": job_id, "state": JobState.SUCCEEDED.value, "result": result}


def fail_job(job_id: str, message: str, *, runtime: JobRuntime, step: int = 0) -> None:
    """Mark a job failed with `message`, tell its listeners, drop its input."""
    message = message[:MAX_ERROR_CHARS]
    log.warning("generation failed", extra={"job_id": job_id, "error": message})
    with runtime.sessions() as session:
        job = session.get(GenerationJob, job_id)
        input_key = None if job is None else job.input_key
        total = 0 if job is None else job.total_steps
        crud.finish_job(session=session, job_id=job_id, state=JobState.FAILED, error=message)
    ProgressReporter(job_id, runtime=runtime, total=total).publish(
        JobState.FAILED, step, error=message
    )
    _forget_input(runtime.store, input_key)


def _generate(
    job_id: str,
    params: dict[str, Any],
    input_key: str | None,
    *,
    runtime: JobRuntime,
    progress: Any,
) -> dict[str, Any]:
    started = time.perf_counter()
    if input_key is None:
        raise ValueError("the job has no input object")
    encoded = input_from_bytes(runtime.store.get_bytes(input_key))
    pins = [PinnedAdapter.from_dict(item) for item in params["adapters"]]
    prepared = runtime.cache.mix([(p.version_id, p.weight) for p in pins])
    n = int(params["num_images"])
    guidance = float(params["guidance"])
    output = generate(
        runtime.base,
        encoded.prompt.float().expand(n, -1, -1),
        steps=int(params["steps"]),
        guidance=guidance,
        seed=int(params["seed"]),
        negative_embeds=None if encoded.negative is None else encoded.negative.float(),
        stop_step=params.get("stop_at_step"),
        merged=prepared.merged,
        progress=progress,
    )
    stored = _store_output(job_id, output, guidance=guidance, runtime=runtime)
    return {
        **stored,
        "adapters": [p.as_dict() for p in pins],
        "mix": "base" if prepared.merged is None else prepared.merged.label,
        "mix_cached": prepared.cached,
        "loaded_from_store": list(prepared.loaded),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "seconds": round(time.perf_counter() - started, 3),
    }


def _store_output(
    job_id: str, output: GenerationResult, *, guidance: float, runtime: JobRuntime
) -> dict[str, Any]:
    prefix = output_prefix(job_id)
    store = runtime.store
    if output.images is None:
        data = latents_to_bytes(output, guidance=guidance)
        key = store.put_bytes(f"{prefix}latents.safetensors", data).key
        state = output.scheduler_state(runtime.base, guidance)
        # The scheduler config holds tuples and numpy scalars: make it plain JSON.
        plain = json.loads(json.dumps(state, default=_plain))
        return {"images": [], "latents_key": key, "scheduler_state": plain}
    keys = []
    for index, array in enumerate(to_uint8(output.images)):
        png = _png(array)
        stored = store.put_stream(
            f"{prefix}image-{index}.png",
            io.BytesIO(png),
            length=len(png),
            content_type="image/png",
        )
        keys.append(stored.key)
    return {"images": keys, "latents_key": None, "scheduler_state": None}


def _png(array: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _forget_input(store: ObjectStore, key: str | None) -> None:
    """A finished job's encoded prompt is not kept (best effort: a leftover is harmless)."""
    if key is None:
        return
    try:
        store.delete(key)
    except Exception as error:
        log.warning("could not delete a job's input", extra={"key": key, "error": str(error)})


class ProgressReporter:
    """Progress of one job: every step on its Redis channel, the row at most every 0.5 s."""

    def __init__(self, job_id: str, *, runtime: JobRuntime, total: int) -> None:
        self.job_id = job_id
        self.runtime = runtime
        self.total = total
        self.last_step = 0
        self._written_at = 0.0

    def step(self, step: int, _steps: int) -> None:
        self.last_step = step
        now = time.monotonic()
        if step >= self.total or now - self._written_at >= PROGRESS_DB_INTERVAL_S:
            self._written_at = now
            with self.runtime.sessions() as session:
                crud.record_progress(session=session, job_id=self.job_id, step=step)
        self.publish(JobState.RUNNING, step)

    def publish(self, state: JobState, step: int, *, error: str | None = None) -> None:
        if self.runtime.redis is None:
            return
        event = {
            "id": self.job_id,
            "state": state.value,
            "step": step,
            "total_steps": self.total,
            "error": error,
            "at": utcnow().isoformat(),
        }
        try:
            self.runtime.redis.publish(generation_channel(self.job_id), json.dumps(event))
        except RedisError as error:
            # Progress events are a convenience: the row is what readers fall back on.
            log.warning(
                "progress not published", extra={"job_id": self.job_id, "error": str(error)}
            )
