"""The queue-depth gauge, set by the API when it queues a job and by a worker when it takes one."""

from __future__ import annotations

import redis
from redis.exceptions import RedisError

from tessera.events import INFERENCE_QUEUE
from tessera.metrics import GENERATION_QUEUE_DEPTH


def record_queue_depth(client: redis.Redis) -> None:
    """Set the queue-depth gauge from the length of the Celery queue's Redis list."""
    try:
        depth = client.llen(INFERENCE_QUEUE)
    except RedisError:
        return
    GENERATION_QUEUE_DEPTH.set(float(depth))  # type: ignore[arg-type]
