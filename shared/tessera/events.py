"""Names on Redis: Celery queues, task names and pub/sub channels, in one place."""

from __future__ import annotations

# Celery queues.
AGGREGATION_QUEUE = "aggregation"
INFERENCE_QUEUE = "inference"

# Celery task names (tasks are sent by name, so services need not import worker code).
TASK_PING = "tessera.system.ping"
TASK_AGGREGATE_ROUND = "tessera.federation.aggregate_round"
TASK_GENERATE = "tessera.inference.generate"

# Pub/sub channel on which the worker announces newly published adapter versions.
ADAPTER_PUBLISHED_CHANNEL = "tessera:adapter-published"

# Pub/sub channel prefix on which inference workers publish a generation job's progress.
GENERATION_PROGRESS_PREFIX = "tessera:generation:"


def generation_channel(job_id: str) -> str:
    """The pub/sub channel of one generation job's progress events."""
    return f"{GENERATION_PROGRESS_PREFIX}{job_id}"
