"""The queue-depth gauge, set by the API when it queues a job and by a worker when it takes one."""

from __future__ import annotations

import redis
from redis.exceptions import RedisError

from tessera.events import INFERENCE_QUEUE
from tessera.metrics import GENERATION_QUEUE_DEPTH
from tessera.queue import pending_messages


def record_queue_depth(client: redis.Redis) -> None:
    """Set the queue-depth gauge from the messages waiting in the Celery queue."""
    try:
        depth = pending_messages(client, INFERENCE_QUEUE)
    except RedisError:
        return
    GENERATION_QUEUE_DEPTH.set(float(depth))
