"""Server-sent events of one job's progress, until it succeeds or fails.

The worker publishes every step on the job's Redis channel; this stream relays those and
re-reads the job's row every few seconds (and at the start, and on a terminal event), so a
client that reconnects, or a lost message, still sees the truth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import redis
from redis.exceptions import RedisError

from services.inference.api.schemas import GenerationOut
from services.inference.crud import is_terminal
from tessera.events import generation_channel

log = logging.getLogger(__name__)

POLL_S = 1.0
DB_REFRESH_S = 3.0
HEARTBEAT_S = 15.0

ReadJob = Callable[[], GenerationOut | None]


def sse(event: str, data: dict[str, Any], *, event_id: str | None = None) -> str:
    """One server-sent event."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, default=str)}")
    return "\n".join(lines) + "\n\n"


def _progress(job_id: str, state: str, step: int, total_steps: int) -> str:
    data = {"id": job_id, "state": state, "step": step, "total_steps": total_steps}
    return sse("progress", data, event_id=f"{state}-{step}")


def _view_event(view: GenerationOut) -> str:
    if is_terminal(view.state):
        return sse(view.state.value, view.model_dump(mode="json"), event_id=view.state.value)
    return _progress(view.id, view.state.value, view.progress.step, view.progress.total_steps)


_ORDER = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2}


def _newer(state: str, step: int, than: tuple[str, int]) -> bool:
    """Whether (state, step) is further on than `than` (a late message never goes back)."""
    return (_ORDER.get(state, 0), step) > (_ORDER.get(than[0], 0), than[1])


async def job_events(
    job_id: str, *, read_job: ReadJob, redis_client: redis.Redis, max_seconds: float
) -> AsyncIterator[str]:
    """The job's events: its state now, each step as it happens, the terminal state last."""
    pubsub = await anyio.to_thread.run_sync(_subscribe, redis_client, job_id)
    try:
        view = await anyio.to_thread.run_sync(read_job)
        if view is None:
            return
        yield _view_event(view)
        if is_terminal(view.state):
            return
        seen = (view.state.value, view.progress.step)
        started = refreshed = beat = time.monotonic()
        while time.monotonic() - started < max_seconds:
            event = await anyio.to_thread.run_sync(_next_event, pubsub)
            now = time.monotonic()
            if event is not None and not is_terminal_name(event.get("state")):
                state, step = str(event.get("state")), int(event.get("step") or 0)
                if _newer(state, step, seen):
                    seen = (state, step)
                    yield _progress(job_id, state, step, int(event.get("total_steps") or 0))
                    beat = now
                continue
            if event is not None or now - refreshed >= DB_REFRESH_S:
                # A terminal event, or a while without one: the row says where the job is.
                refreshed = now
                view = await anyio.to_thread.run_sync(read_job)
                if view is None:
                    return
                if is_terminal(view.state) or _newer(view.state.value, view.progress.step, seen):
                    seen = (view.state.value, view.progress.step)
                    yield _view_event(view)
                    beat = now
                    if is_terminal(view.state):
                        return
            if now - beat >= HEARTBEAT_S:
                beat = now
                yield ": keep-alive\n\n"
    finally:
        if pubsub is not None:
            await anyio.to_thread.run_sync(_close, pubsub)


def is_terminal_name(state: object) -> bool:
    return state in ("succeeded", "failed")


def _subscribe(client: redis.Redis, job_id: str) -> Any:
    """A subscription to the job's channel, or None while Redis is away (then: polling)."""
    try:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(generation_channel(job_id))
    except RedisError as error:
        log.warning("progress events unavailable; polling", extra={"error": str(error)})
        return None
    return pubsub


def _next_event(pubsub: Any) -> dict[str, Any] | None:
    if pubsub is None:
        time.sleep(POLL_S)
        return None
    try:
        message = pubsub.get_message(timeout=POLL_S)
    except RedisError:
        time.sleep(POLL_S)
        return None
    if message is None or message.get("type") != "message":
        return None
    try:
        event = json.loads(message["data"])
    except (TypeError, ValueError):
        return None
    return event if isinstance(event, dict) else None


def _close(pubsub: Any) -> None:
    with contextlib.suppress(RedisError):
        pubsub.close()
