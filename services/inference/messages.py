"""Messages on the inference queue: wake-ups, and what each one ran.

A message asks a worker to run the next queued job in fair order, not necessarily the job it
was sent for (`services.inference.worker.runner.run_next`). A worker records which job a
message started; if that message comes back (Redis redelivers the message of a worker that died
holding it: at once when only its pool process died, after the visibility timeout when the whole
worker did), the job it started goes back to the queue at once, unless it has been run again
since.
"""

from __future__ import annotations

import json
import logging

import redis
from celery import Celery
from redis.exceptions import RedisError

from tessera.events import INFERENCE_QUEUE, TASK_GENERATE

log = logging.getLogger(__name__)

RUN_KEY = "tessera:generation-message:{}"


def send_wakeup(celery: Celery, job_id: str) -> None:
    """One message on the inference queue, sent for `job_id` (a worker runs the next job)."""
    celery.send_task(TASK_GENERATE, args=[job_id], queue=INFERENCE_QUEUE, ignore_result=True)


def record_run(
    client: redis.Redis | None, message_id: str, job_id: str, attempts: int, ttl_s: float
) -> None:
    """Remember that message `message_id` started run `attempts` of `job_id` (best effort:
    without it a dead worker's job comes back through the stalled-job loop, later)."""
    if client is None:
        return
    record = json.dumps({"job": job_id, "attempts": attempts})
    try:
        client.set(RUN_KEY.format(message_id), record, ex=max(1, int(ttl_s)))
    except RedisError as error:
        log.warning("run not recorded", extra={"job_id": job_id, "error": str(error)})


def recorded_run(client: redis.Redis | None, message_id: str) -> tuple[str, int] | None:
    """The job and run that message `message_id` started, if it was recorded."""
    if client is None:
        return None
    try:
        raw = client.get(RUN_KEY.format(message_id))
    except RedisError:
        return None
    if raw is None:
        return None
    record = json.loads(raw)  # type: ignore[arg-type]
    return str(record["job"]), int(record["attempts"])
