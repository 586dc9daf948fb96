"""Names on Redis: Celery queues, task names and pub/sub channels, in one place."""

from __future__ import annotations

# Celery queues.
AGGREGATION_QUEUE = "aggregation"
INFERENCE_QUEUE = "inference"

# Celery task names (tasks are sent by name, so services need not import worker code).
TASK_PING = "tessera.system.ping"

# Pub/sub channel on which the worker announces newly published adapter versions.
ADAPTER_PUBLISHED_CHANNEL = "tessera:adapter-published"
