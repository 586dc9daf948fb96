"""Generation jobs: submit (202, queued on Celery queue `inference`), read, follow over SSE."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, FastAPI, Header, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.inference import crud
from services.inference.api.admission import AdmissionError, admit
from services.inference.api.deps import ModelFactsDep
from services.inference.api.progress_stream import DB_THREADS, SHUTDOWN_GRACE_S, job_events
from services.inference.api.schemas import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    GenerationCreate,
    GenerationOut,
    JobId,
)
from services.inference.api.submission import SubmissionError, plan_job, request_fingerprint
from services.inference.api.views import job_view
from services.inference.embeddings import input_to_bytes
from services.inference.messages import send_wakeup
from services.inference.queue_depth import record_queue_depth
from tessera.config import Settings
from tessera.models import GenerationJob, JobState, Role
from tessera.service.auth import GeneratorDep, Principal, PrincipalDep
from tessera.service.deps import (
    CeleryDep,
    ClusteringHttpDep,
    RedisDep,
    ResourcesDep,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from tessera.service.resources import Resources
from tessera.service.slots import ClientSlots
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/generations", tags=["generations"])

STREAM_RETRY_AFTER_S = 5
STREAM_SLOTS = "streams"  # the kind of ClientSlots a progress stream holds

CREATE_DESCRIPTION = """
Queue a generation with one base model and a blend of LoRA adapters.

**Prompt.** `prompt_embeds`: the token embeddings of one prompt from the base model's text
encoder, float16, base64-encoded. With `embeds_format` `"safetensors"` (the default) it is a
safetensors file holding one F16 tensor named `prompt_embeds`, shape `[T, 384]` or
`[1, T, 384]` (what `tessera device encode TEXT --out FILE` writes); with `"f16le"` it is the
raw little-endian float16 values of a `[T, 384]` array, row-major. `negative_embeds` is
optional, in the same format and with the same T. A plaintext `prompt` is accepted only when
the server runs with `TESSERA_ALLOW_PLAINTEXT_PROMPTS=true`; otherwise 422.

**Adapters.** A list `[{"adapter": "cluster:3" | "global" | "<version id>", "weight": 0.7}]`
(at most 8, weights finite, >= 0, at least one > 0; an empty list means the base model alone),
or `"auto"` with `pooled` (the prompt's L2-normalised pooled vector): the clustering service
routes it to its `top_k` nearest clusters (softmax at `temperature`) and the job blends their
adapters. Names are resolved now, to version ids that the job records and runs on, whatever
is published meanwhile.

**Limits.** steps 1..100, guidance 1..20, num_images 1..8, size: the model's native size only
(32 for the bundled model). `stop_at_step` k (1..steps-1) makes a split job: the server runs k
steps and returns the latents and scheduler state for `tessera device finish`.

**Quotas.** A client may have TESSERA_GENERATION_JOBS_PER_CLIENT jobs queued or running, the
service TESSERA_GENERATION_QUEUE_CAP, and a client may submit TESSERA_GENERATION_QUOTA jobs
within TESSERA_GENERATION_QUOTA_WINDOW_S seconds; beyond any of them, 429 with `Retry-After`
(seconds). Workers take queued jobs round robin between clients.

**Idempotency.** A request with an `Idempotency-Key` header (at most 128 characters) that
repeats one of the same client's earlier keys returns that job (200) instead of a new one; the
same key with a different request is a 409.

Answers 202 with the job. Any refusal (4xx) stores and queues nothing.
"""


def _job_for(session: Session, job_id: str, principal: Principal) -> GenerationJob:
    """The job, if the caller owns it or is an operator; 404 otherwise (no existence leak)."""
    job = session.get(GenerationJob, job_id)
    if job is None or (
        principal.role is not Role.OPERATOR and job.client_id != principal.client_id
    ):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such generation job")
    return job


def _admit(session: Session, settings: Settings, client_id: int, *, lock: bool) -> None:
    """429 with Retry-After when the client or the queue is at its cap."""
    try:
        admit(session=session, settings=settings, client_id=client_id, lock=lock)
    except AdmissionError as error:
        session.rollback()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=error.detail,
            headers={"Retry-After": str(error.retry_after_s)},
        ) from None


def _replay(
    existing: GenerationJob, body: GenerationCreate, *, store: ObjectStore, expires_s: int
) -> GenerationOut:
    if existing.params.get("request_sha256") != request_fingerprint(body):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail="this Idempotency-Key was used for a different request; use a new key",
        )
    return job_view(existing, store=store, expires_s=expires_s)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Queue a generation job",
    description=CREATE_DESCRIPTION,
    responses={
        200: {"model": GenerationOut, "description": "an Idempotency-Key replay: the job"},
        401: {"description": "missing or invalid token"},
        403: {"description": "not a generator or operator client"},
        409: {"description": "Idempotency-Key reused for another request; no clustering yet"},
        413: {"description": "request body too large"},
        429: {
            "description": "the client's or the queue's job cap, or the client's quota, is "
            "reached; see Retry-After"
        },
        422: {
            "description": "bad embeddings, unknown adapter, weights or limits; the field is named"
        },
        503: {"description": "the queue or the clustering service is unavailable"},
    },
)
def create_generation(
    body: GenerationCreate,
    principal: GeneratorDep,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    redis_client: RedisDep,
    facts: ModelFactsDep,
    clustering: ClusteringHttpDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY_CHARS,
            pattern=r"^[\x21-\x7e]+$",
        ),
    ] = None,
) -> GenerationOut:
    if principal.client_id is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="the bootstrap operator token cannot own generation jobs: enrol a client "
            "with role generator (or operator) and use its token",
        )
    expires_s = settings.presign_expiry_s
    if idempotency_key is not None:
        existing = crud.job_by_idempotency_key(
            session=session, client_id=principal.client_id, key=idempotency_key
        )
        if existing is not None:
            response.status_code = status.HTTP_200_OK
            return _replay(existing, body, store=store, expires_s=expires_s)
    _admit(session, settings, principal.client_id, lock=False)  # refused early, before work
    try:
        plan = plan_job(
            body, session=session, settings=settings, facts=facts, clustering=clustering
        )
    except SubmissionError as error:
        raise HTTPException(error.status, detail=error.detail) from None
    _admit(session, settings, principal.client_id, lock=True)  # held until the job commits

    job_id = str(uuid.uuid4())
    input_key = store.put_bytes(f"inputs/{job_id}.safetensors", input_to_bytes(plan.encoded)).key
    job = GenerationJob(
        id=job_id,
        client_id=principal.client_id,
        idempotency_key=idempotency_key,
        state=JobState.QUEUED,
        params=plan.params,
        input_key=input_key,
        total_steps=int(plan.params["stop_at_step"] or plan.params["steps"]),
        batch_key=plan.batch_key,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # The same key raced in from another request of this client: that one won.
        session.rollback()
        store.delete(input_key)
        assert idempotency_key is not None
        winner = crud.job_by_idempotency_key(
            session=session, client_id=principal.client_id, key=idempotency_key
        )
        if winner is None:
            raise
        response.status_code = status.HTTP_200_OK
        return _replay(winner, body, store=store, expires_s=expires_s)
    try:
        send_wakeup(celery, job_id)  # a worker runs the next job in fair order
    except Exception as error:
        log.error("could not queue a generation job", extra={"job_id": job_id, "error": str(error)})
        session.delete(job)
        session.commit()
        store.delete(input_key)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="the job queue is unavailable; retry"
        ) from None
    record_queue_depth(redis_client)
    log.info(
        "generation job queued",
        extra={"job_id": job_id, "client_id": principal.client_id, "steps": body.steps},
    )
    return job_view(job, store=store, expires_s=expires_s)


@router.get(
    "/{job_id}",
    summary="A job's state, progress (step i of N) and, once done, its output URLs",
    responses={404: {"description": "no such job, or not the caller's"}},
)
def get_generation(
    job_id: JobId,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> GenerationOut:
    job = _job_for(session, job_id, principal)
    return job_view(job, store=store, expires_s=settings.presign_expiry_s)


@router.get(
    "/{job_id}/events",
    summary="Server-sent events: `progress` per step, then `succeeded` or `failed` (the job), "
    "or `end` if the stream stops first",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        404: {"description": "no such job, or not the caller's"},
        429: {"description": "the client holds TESSERA_MAX_STREAMS_PER_CLIENT streams already"},
        503: {"description": "Redis is unavailable"},
    },
)
async def generation_events(
    job_id: JobId, request: Request, principal: PrincipalDep, resources: ResourcesDep
) -> EventSourceResponse:
    await run_in_threadpool(_check_owner, resources, job_id, principal)  # 404 before the stream
    settings = resources.settings
    slots = ClientSlots(
        resources.async_redis, kind=STREAM_SLOTS, cap=settings.max_streams_per_client
    )
    holder = "operator" if principal.client_id is None else str(principal.client_id)
    try:
        member = await slots.acquire(holder)
    except (RedisError, OSError):
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="progress streams are unavailable (Redis does not answer); retry",
            headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
        ) from None
    if member is None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"this client already follows {settings.max_streams_per_client} jobs "
            "(TESSERA_MAX_STREAMS_PER_CLIENT): close one, or poll GET /v1/generations/{id}",
            headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
        )

    def read_job() -> GenerationOut | None:
        with resources.sessions() as own:
            job = own.get(GenerationJob, job_id)
            if job is None:
                return None
            return job_view(job, store=resources.store, expires_s=settings.presign_expiry_s)

    shutdown = anyio.Event()  # set by sse-starlette when the server begins to shut down

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            async for event in job_events(
                job_id,
                read_job=read_job,
                redis_client=resources.async_redis,
                limiter=stream_db_limiter(request.app),
                max_seconds=settings.task_time_limit_s + 60,
                renew=lambda: slots.renew(holder, member),
                shutdown=shutdown,
            ):
                yield event
        finally:
            with contextlib.suppress(RedisError, OSError):
                await slots.release(holder, member)

    return EventSourceResponse(
        events(),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_S,  # time to send the `end` event
    )


def _check_owner(resources: Resources, job_id: str, principal: Principal) -> None:
    with resources.sessions() as session:
        _job_for(session, job_id, principal)


def stream_db_limiter(app: FastAPI) -> anyio.CapacityLimiter:
    """The threads this process's streams share for their row reads (made on first use, in
    the event loop)."""
    limiter: anyio.CapacityLimiter | None = getattr(app.state, "stream_db_limiter", None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(DB_THREADS)
        app.state.stream_db_limiter = limiter
    return limiter
