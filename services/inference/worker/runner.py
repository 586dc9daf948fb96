"""Running generation jobs: the work of the inference task, as plain functions.

A message on the inference queue asks a worker to run a queued job, not necessarily the one it
was sent for: the worker takes the next job in fair order (`run_next`: round robin between
clients, `services.inference.crud.next_fair_job`), so one client's many jobs never keep another
client's waiting behind them all. Each queued job was sent one message; a message that finds
nothing queued (its job ran in another's stead, or in a batch) does nothing.

Idempotent: only a queued job is started, by one worker (a conditional UPDATE), and a job ends
once. A job whose worker dies stays running until the inference API's stalled-job loop
(`services.inference.api.stalled`), seeing its heartbeat stop, puts it back in the queue; a
redelivered message is one more wake-up. A rerun gives the same images (generation is
deterministic given the seed). Progress goes to the job's row (throttled) and to its Redis
channel (every step); the database stays the source of truth.

Batches: a job takes queued jobs with the same batch key (steps, guidance, size, prompt length)
into its run, up to TESSERA_INFERENCE_MAX_BATCH_IMAGES images, and runs them as one UNet batch:
each keeps its own prompt, negative, seed and adapter mix (jobs with different mixes run with a
per-sample mix, `tessera.lora.mixing.per_sample_mix`), so its images are those it would get
alone (to float tolerance), and each gets its own result and events. A batch goes back to the
queue, or fails, as one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
import sqlalchemy.exc
import torch
import urllib3
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud, messages
from services.inference.embeddings import input_from_bytes
from services.inference.mixes import PinnedAdapter
from services.inference.worker.cache import AdapterCache
from tessera.data.tensors import to_uint8
from tessera.events import generation_channel
from tessera.heartbeat import Heartbeat
from tessera.metrics import GENERATION_SECONDS
from tessera.model.base import BaseModel
from tessera.model.conditioning import Conditioning
from tessera.model.generate import GenerationResult, generate, latents_to_bytes, seeded_latents
from tessera.models import GenerationJob, JobState, utcnow
from tessera.schemas import as_utc
from tessera.storage import ObjectStore, StorageUnavailableError

log = logging.getLogger(__name__)

PROGRESS_DB_INTERVAL_S = 0.5
CLAIM_TRIES = 5  # fair picks one message tries while other workers take those jobs first
MAX_ERROR_CHARS = 2000
# Connection errors: the job goes back to the queue and the task retries its message.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError,
    urllib3.exceptions.HTTPError,
    StorageUnavailableError,  # the object store refused a connection or answered 5xx
)


@dataclass
class JobRuntime:
    """What running a job needs: connections, the base model and the adapter cache."""

    sessions: sessionmaker[Session]
    store: ObjectStore
    redis: redis.Redis | None
    base: BaseModel
    cache: AdapterCache
    max_batch_images: int = 1  # TESSERA_INFERENCE_MAX_BATCH_IMAGES; 1: every job alone
    stale_s: float = 60.0  # TESSERA_TASK_STALE_S: the heartbeat beats every quarter of it
    # How long what a message ran is remembered: past Redis's visibility timeout, the latest
    # a dead worker's message can come back (TESSERA_TASK_TIME_LIMIT_S + 300 s).
    message_ttl_s: float = 3600.0


def output_prefix(job_id: str) -> str:
    return f"generations/{job_id}/"


def run_next(
    *, runtime: JobRuntime, give_up: bool = False, message_id: str | None = None
) -> dict[str, Any]:
    """Run the next queued job in fair order (with the jobs that share its batch); a summary,
    state "idle" if nothing is queued. `give_up`: a connection error fails the job instead of
    putting it back in the queue (the task's last retry); `message_id`: the message this runs
    for, recorded with the job it starts (see `reclaim`)."""
    for _ in range(CLAIM_TRIES):  # another worker may take the same job first
        with runtime.sessions() as session:
            job_id = crud.next_fair_job(session=session)
        if job_id is None:
            break
        summary = run_generation(job_id, runtime=runtime, give_up=give_up, message_id=message_id)
        if not summary.get("skipped"):
            return summary
    return {"id": None, "state": "idle"}


def reclaim(message_id: str, *, runtime: JobRuntime) -> list[str]:
    """A message came back (the worker that held it died): put the job it started, and that
    job's batch, back in the queue, unless it has ended or been run again since; the ids."""
    recorded = messages.recorded_run(runtime.redis, message_id)
    if recorded is None:
        return []
    job_id, attempts = recorded
    same_run = (GenerationJob.attempts == attempts) & GenerationJob.batch_leader.is_(None)
    with runtime.sessions() as session:
        back = crud.requeue_batch(session=session, leader_id=job_id, where=same_run)
    if back:
        log.warning("a dead worker's job is queued again", extra={"jobs": back})
    return back


def run_generation(
    job_id: str, *, runtime: JobRuntime, give_up: bool = False, message_id: str | None = None
) -> dict[str, Any]:
    """Run queued job `job_id` to a terminal state, with any queued jobs that can share its
    UNet batch; returns a summary (state, the result, the ids of the batch). A job that is not
    queued is skipped. On a connection error the batch goes back to the queue (`give_up`: it
    fails) and the error propagates."""
    with runtime.sessions() as session:
        job = session.get(GenerationJob, job_id)
        if job is None:
            log.warning("generation job not found", extra={"job_id": job_id})
            return {"id": job_id, "state": "missing", "skipped": True}
        if job.state is not JobState.QUEUED:
            return {"id": job_id, "state": job.state.value, "skipped": True}
        leader = _Member.of(job, runtime=runtime)
        batch_key = job.batch_key
    with runtime.sessions() as session:
        if not crud.claim_job(session=session, job_id=job_id, total_steps=leader.total):
            return {"id": job_id, "state": "skipped", "skipped": True}
        if message_id is not None:
            attempts = session.scalar(
                select(GenerationJob.attempts).where(GenerationJob.id == job_id)
            )
            messages.record_run(
                runtime.redis, message_id, job_id, int(attempts or 0), runtime.message_ttl_s
            )
    beat = Heartbeat.for_stale_after(
        lambda: _beat(job_id, runtime), stale_s=runtime.stale_s, name=f"job-{job_id}"
    )
    try:
        with beat:
            members = [leader, *_gather_batch(leader, batch_key, runtime=runtime)]
            for member in members:
                member.reporter.publish(JobState.RUNNING, 0)
            results = _generate(members, runtime=runtime)
    except TRANSIENT_ERRORS as error:
        if give_up:
            message = f"gave up after retries: {type(error).__name__}: {error}"
            fail_job(job_id, message, runtime=runtime, step=leader.reporter.last_step)
        else:
            _requeue(job_id, runtime=runtime)
        raise
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        fail_job(job_id, message, runtime=runtime, step=leader.reporter.last_step)  # and its batch
        raise
    for member, result in zip(members, results, strict=True):
        with runtime.sessions() as session:
            finished = crud.finish_job(
                session=session,
                job_id=member.job_id,
                state=JobState.SUCCEEDED,
                result=result,
                progress_step=member.total,
            )
        member.reporter.publish(JobState.SUCCEEDED, member.total)
        _forget_input(runtime.store, member.input_key)
        GENERATION_SECONDS.observe((finished - as_utc(member.created_at)).total_seconds())
    log.info(
        "generation succeeded",
        extra={"job_id": job_id, "mix": results[0]["mix"], "batch": len(members)},
    )
    return {
        "id": job_id,
        "state": JobState.SUCCEEDED.value,
        "result": results[0],
        "batch": [member.job_id for member in members],
    }


def _requeue(job_id: str, *, runtime: JobRuntime) -> None:
    """Put the batch back in the queue after a connection error (best effort: while the
    database is away the stalled-job loop does it once the heartbeat is stale)."""
    try:
        with runtime.sessions() as session:
            crud.requeue_batch(session=session, leader_id=job_id)
    except Exception as error:
        log.warning("could not requeue a job", extra={"job_id": job_id, "error": str(error)})


def _beat(job_id: str, runtime: JobRuntime) -> None:
    with runtime.sessions() as session:
        crud.beat_batch(session=session, leader_id=job_id)


@dataclass(frozen=True)
class _Member:
    """A job of the batch being run, as its row says, with its progress reporter."""

    job_id: str
    params: dict[str, Any]
    input_key: str | None
    created_at: datetime
    reporter: ProgressReporter

    @classmethod
    def of(cls, job: GenerationJob, *, runtime: JobRuntime) -> _Member:
        params = dict(job.params)
        total = int(params.get("stop_at_step") or params["steps"])
        reporter = ProgressReporter(job.id, runtime=runtime, total=total)
        return cls(job.id, params, job.input_key, job.created_at, reporter)

    @property
    def total(self) -> int:
        return self.reporter.total

    @property
    def images(self) -> int:
        return int(self.params["num_images"])

    @property
    def pins(self) -> list[PinnedAdapter]:
        return [PinnedAdapter.from_dict(item) for item in self.params["adapters"]]


def _gather_batch(leader: _Member, batch_key: str | None, *, runtime: JobRuntime) -> list[_Member]:
    """Queued jobs with the leader's batch key, oldest first, while the images fit in
    TESSERA_INFERENCE_MAX_BATCH_IMAGES."""
    if batch_key is None:
        return []
    room = runtime.max_batch_images - leader.images
    with runtime.sessions() as session:
        candidates = crud.batch_candidates(
            session=session, leader_id=leader.job_id, batch_key=batch_key
        )
        taken = []
        for member in (_Member.of(row, runtime=runtime) for row in candidates):
            if member.images > room:
                continue
            if crud.join_batch(
                session=session,
                job_id=member.job_id,
                leader_id=leader.job_id,
                total_steps=member.total,
            ):
                taken.append(member)
                room -= member.images
    return taken


def _generate(members: list[_Member], *, runtime: JobRuntime) -> list[dict[str, Any]]:
    """Run the batch as one generation; each member's result, its images stored."""
    started = time.perf_counter()
    leader = members[0]
    params = leader.params  # the batch key makes steps, guidance, size and prompt length the same
    inputs = []
    for member in members:
        if member.input_key is None:
            raise ValueError(f"job {member.job_id} has no input object")
        inputs.append(input_from_bytes(runtime.store.get_bytes(member.input_key)))
    counts = [member.images for member in members]
    prepared, active = runtime.cache.batch_mix(
        [[(p.version_id, p.weight) for p in member.pins] for member in members], counts
    )
    guidance = float(params["guidance"])
    prompts, negatives, latents = [], [], []
    for member, encoded, n in zip(members, inputs, counts, strict=True):
        prompts.append(Conditioning(encoded.prompt.float(), _float(encoded.pooled)).expand(n))
        if encoded.negative is None:
            negative = _empty_prompt(runtime.base, encoded.tokens)
        else:
            negative = Conditioning(encoded.negative.float(), _float(encoded.negative_pooled))
        negatives.append(negative.expand(n))
        latents.append(seeded_latents(runtime.base, n, int(member.params["seed"])))

    def progress(step: int, steps: int) -> None:
        for member in members:
            member.reporter.step(step, steps)

    output = generate(
        runtime.base,
        Conditioning.cat(prompts),
        steps=int(params["steps"]),
        guidance=guidance,
        negative_embeds=Conditioning.cat(negatives),
        start_latents=torch.cat(latents),
        stop_step=params.get("stop_at_step"),
        merged=active,
        progress=progress,
    )
    seconds = round(time.perf_counter() - started, 3)
    batch = {
        "leader": leader.job_id,
        "jobs": len(members),
        "images": sum(counts),
        "mixes": len({mix.key for mix in prepared}),
    }
    results = []
    offset = 0
    for member, mix, n in zip(members, prepared, counts, strict=True):
        part = GenerationResult(
            images=None if output.images is None else output.images[offset : offset + n],
            latents=output.latents[offset : offset + n],
            step=output.step,
            steps=output.steps,
            sampler=output.sampler,
        )
        offset += n
        stored = _store_output(member.job_id, part, guidance=guidance, runtime=runtime)
        results.append(
            {
                **stored,
                "adapters": [p.as_dict() for p in member.pins],
                "mix": "base" if mix.active is None else mix.active.label,
                "mix_cached": mix.cached,
                "mix_merged": mix.is_merged,
                "loaded_from_store": list(mix.loaded),
                "worker": f"{socket.gethostname()}:{os.getpid()}",
                "seconds": seconds,
                "batch": batch,
            }
        )
    return results


def _empty_prompt(base: BaseModel, tokens: int) -> Conditioning:
    """The model's empty prompt as `tokens` token states [1, tokens, width]: the first states of
    its padded encoding (CLIP is causal and MiniLM masks the padding, so they are a prefix)."""
    empty = base.prompts.empty()
    if empty.embeds.shape[1] < tokens:
        raise ValueError(
            f"the prompt has {tokens} tokens; the model's empty prompt has "
            f"{empty.embeds.shape[1]}: send negative_embeds of the same length"
        )
    return Conditioning(empty.embeds[:, :tokens], empty.pooled)


def _float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


def fail_job(job_id: str, message: str, *, runtime: JobRuntime, step: int = 0) -> None:
    """Mark a job failed with `message`, and the jobs running in its batch; tell their
    listeners, drop their inputs."""
    message = message[:MAX_ERROR_CHARS]
    with runtime.sessions() as session:
        followers = crud.batch_followers(session=session, leader_id=job_id)
    for failed in (job_id, *followers):
        log.warning("generation failed", extra={"job_id": failed, "error": message})
        with runtime.sessions() as session:
            job = session.get(GenerationJob, failed)
            input_key = None if job is None else job.input_key
            total = 0 if job is None else job.total_steps
            crud.finish_job(session=session, job_id=failed, state=JobState.FAILED, error=message)
        ProgressReporter(failed, runtime=runtime, total=total).publish(
            JobState.FAILED, step, error=message
        )
        _forget_input(runtime.store, input_key)


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
