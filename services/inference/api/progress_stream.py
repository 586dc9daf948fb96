"""Server-sent events of one job's progress, always ending with a final event.

Everything waits on the event loop: the job's Redis channel through `redis.asyncio` (no thread
blocks on a message), and the job's row, re-read every few seconds (at the start, on a terminal
event, and when nothing arrives), through a small thread limiter of its own. However many
clients follow, the synchronous routes keep the shared thread pool.

The last event is the job's terminal state (`succeeded` or `failed`, with the job), or `end`
when the stream stops first (time limit, job gone, the server shutting down), saying why and
where the job was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from services.inference.api.schemas import GenerationOut
from services.inference.crud import is_terminal
from tessera.events import generation_channel

log = logging.getLogger(__name__)

POLL_S = 1.0
DB_REFRESH_S = 3.0
# How long a stream has to send its `end` event once the server begins to shut down: a stream
# notices within POLL_S (and a row read).
SHUTDOWN_GRACE_S = 3.0
SHUTTING_DOWN = "the server is shutting down; reconnect"
DB_THREADS = 4  # threads all streams of a process share for their row reads

ReadJob = Callable[[], GenerationOut | None]
Renew = Callable[[], Any]

_ORDER = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2}


def _progress(job_id: str, state: str, step: int, total_steps: int) -> ServerSentEvent:
    data = {"id": job_id, "state": state, "step": step, "total_steps": total_steps}
    return ServerSentEvent(data=json.dumps(data), event="progress", id=f"{state}-{step}")


def _view_event(view: GenerationOut) -> ServerSentEvent:
    if is_terminal(view.state):
        data = json.dumps(view.model_dump(mode="json"))
        return ServerSentEvent(data=data, event=view.state.value, id=view.state.value)
    return _progress(view.id, view.state.value, view.progress.step, view.progress.total_steps)


def end_event(job_id: str, state: str | None, reason: str) -> ServerSentEvent:
    """The final event of a stream that stops before its job ends."""
    data = {"id": job_id, "state": state, "reason": reason}
    return ServerSentEvent(data=json.dumps(data), event="end", id="end")


def _newer(state: str, step: int, than: tuple[str, int]) -> bool:
    """Whether (state, step) is further on than `than` (a late message never goes back)."""
    return (_ORDER.get(state, 0), step) > (_ORDER.get(than[0], 0), than[1])


class _Follower:
    """One stream's view of its job: what was last sent, and the job's row re-read."""

    def __init__(self, job_id: str, read_job: ReadJob, limiter: anyio.CapacityLimiter) -> None:
        self.job_id = job_id
        self._read_job = read_job
        self._limiter = limiter
        self.seen: tuple[str, int] = ("queued", -1)
        self.done = False

    async def read(self) -> ServerSentEvent | None:
        """The row's event if it is further on than what was sent; `done` once terminal."""
        view = await anyio.to_thread.run_sync(self._read_job, limiter=self._limiter)
        if view is None:
            self.done = True
            return end_event(self.job_id, None, "the job no longer exists")
        if is_terminal(view.state) or _newer(view.state.value, view.progress.step, self.seen):
            self.seen = (view.state.value, view.progress.step)
            self.done = is_terminal(view.state)
            return _view_event(view)
        return None

    def relay(self, event: dict[str, Any]) -> ServerSentEvent | None:
        """A step published by the worker, if it is further on than what was sent."""
        state, step = str(event.get("state")), int(event.get("step") or 0)
        if not _newer(state, step, self.seen):
            return None
        self.seen = (state, step)
        return _progress(self.job_id, state, step, int(event.get("total_steps") or 0))


async def job_events(
    job_id: str,
    *,
    read_job: ReadJob,
    redis_client: aioredis.Redis,
    limiter: anyio.CapacityLimiter,
    max_seconds: float,
    renew: Renew | None = None,
    shutdown: anyio.Event | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The job's events: its state now, each step as it happens, a final event last.

    `renew` is awaited every `DB_REFRESH_S` or so (the caller keeps its stream slot alive);
    once `shutdown` is set, the stream ends with an `end` event.
    """
    follower = _Follower(job_id, read_job, limiter)
    pubsub = await _subscribe(redis_client, job_id)
    try:
        first = await follower.read()
        if first is not None:
            yield first
        started = refreshed = renewed = time.monotonic()
        while not follower.done:
            if shutdown is not None and shutdown.is_set():
                yield end_event(job_id, follower.seen[0], SHUTTING_DOWN)
                return
            now = time.monotonic()
            if now - started >= max_seconds:
                yield end_event(job_id, follower.seen[0], "the stream's time limit; reconnect")
                return
            if renew is not None and now - renewed >= DB_REFRESH_S:
                renewed = now
                await renew()
            event = await _next_event(pubsub)
            if event is not None and event.get("state") not in ("succeeded", "failed"):
                relayed = follower.relay(event)
                if relayed is not None:
                    yield relayed
                continue
            now = time.monotonic()
            if event is not None or now - refreshed >= DB_REFRESH_S:
                # A terminal event, or a while without one: the row says where the job is.
                refreshed = now
                found = await follower.read()
                if found is not None:
                    yield found
    finally:
        if pubsub is not None:
            with anyio.CancelScope(shield=True):
                await _close(pubsub)


async def _subscribe(client: aioredis.Redis, job_id: str) -> Any:
    """A subscription to the job's channel, or None while Redis is away (then: polling)."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(generation_channel(job_id))
    except (RedisError, OSError) as error:
        log.warning("progress events unavailable; polling", extra={"error": str(error)})
        await _close(pubsub)
        return None
    return pubsub


async def _next_event(pubsub: Any) -> dict[str, Any] | None:
    """The next message on the job's channel within POLL_S, or None."""
    if pubsub is None:
        await anyio.sleep(POLL_S)
        return None
    try:
        message = await pubsub.get_message(timeout=POLL_S)
    except (RedisError, OSError):
        await anyio.sleep(POLL_S)
        return None
    if message is None or message.get("type") != "message":
        return None
    try:
        event = json.loads(message["data"])
    except (TypeError, ValueError):
        return None
    return event if isinstance(event, dict) else None


async def _close(pubsub: Any) -> None:
    with contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()
