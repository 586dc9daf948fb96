"""Names on Redis: Celery queues, task names and pub/sub channels, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis

# Celery queues.
AGGREGATION_QUEUE = "aggregation"
INFERENCE_QUEUE = "inference"

# Celery task names (tasks are sent by name, so services need not import worker code).
TASK_PING = "tessera.system.ping"
TASK_AGGREGATE_ROUND = "tessera.federation.aggregate_round"
TASK_GENERATE = "tessera.inference.generate"
TASK_RECLUSTER = "tessera.clustering.recluster"  # on the aggregation queue

# Pub/sub channel prefix on which inference workers publish a generation job's progress.
GENERATION_PROGRESS_PREFIX = "tessera:generation:"


def adapter_published_channel(redis: Redis) -> str:
    """The pub/sub channel on which the worker announces newly published adapter versions.

    It names `redis`'s database: Redis hands a message to every subscriber of a channel whatever
    database each selected, so federations sharing one server on databases of their own (as
    parallel test runs do) would hear each other's adapters; kombu scopes Celery's broadcasts
    to the database the same way.
    """
    return f"tessera:{redis.connection_pool.connection_kwargs.get('db', 0)}:adapter-published"


def generation_channel(job_id: str) -> str:
    """The pub/sub channel of one generation job's progress events."""
    return f"{GENERATION_PROGRESS_PREFIX}{job_id}"
