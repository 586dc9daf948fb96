"""The Celery application, built from settings: the one place its configuration lives."""

from __future__ import annotations

import redis
from celery import Celery

from tessera.config import Settings
from tessera.events import AGGREGATION_QUEUE

# A result or a message past this is dropped by Redis; long enough for a slow day.
RESULT_EXPIRES_S = 24 * 3600
# Workers: a Redis that hangs is given SOCKET_TIMEOUT_S per read (idle workers are unaffected:
# BRPOP waits 1 s at a time). A process that answers requests (`quick`) gives it
# QUICK_SOCKET_TIMEOUT_S, so that a request that sends a task answers 503 within a few seconds
# while Redis hangs, and within about a second while it refuses connections (Celery's defaults
# reconnected 20 times, 1 s apart, and read without a timeout: forever). One quick retry
# survives a Redis restart (the pooled connection is dead, a new one works).
CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 5.0
QUICK_SOCKET_TIMEOUT_S = 1.5
_QUICK_RETRIES = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


# Redis hands an unacknowledged message to another worker this long after it was delivered,
# whether or not its worker is alive, so it must outlast any task: a shorter one would run a
# task that is still running a second time. Recovery from a dead worker does not wait for it:
# heartbeats and the services' housekeeping loops bring a dead worker's round or job back
# within TESSERA_TASK_STALE_S, and a redelivered message finds its work done or taken
# (README, "Rounds and jobs always finish").
VISIBILITY_MARGIN_S = 300


def visibility_timeout_s(settings: Settings) -> int:
    """Redis's visibility timeout: the task time limit and a margin."""
    return settings.task_time_limit_s + VISIBILITY_MARGIN_S


def make_celery(settings: Settings, *, main: str = "tessera", quick: bool = False) -> Celery:
    """A Celery app on the Redis in `settings`; connects lazily, on first use. `quick`: for a
    process that answers requests (short socket timeouts)."""
    if not settings.redis_url:
        raise ValueError(
            "TESSERA_REDIS_URL is not set: configure a Redis server, or start the stack "
            "with `tessera up`, which starts an embedded Valkey"
        )
    app = Celery(main, broker=settings.redis_url, backend=settings.redis_url)
    socket_timeout = QUICK_SOCKET_TIMEOUT_S if quick else SOCKET_TIMEOUT_S
    connect_timeout = min(CONNECT_TIMEOUT_S, socket_timeout)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=AGGREGATION_QUEUE,
        # Acknowledge after the task ran, one message per worker process at a time: a
        # worker that dies mid-task leaves the message to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 30),
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s(settings),
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
        },
        result_backend_transport_options={
            "visibility_timeout": visibility_timeout_s(settings),
            "retry_policy": _QUICK_RETRIES,
        },
        broker_connection_timeout=connect_timeout,
        task_publish_retry_policy=_QUICK_RETRIES,
        redis_socket_connect_timeout=connect_timeout,
        redis_socket_timeout=socket_timeout,
        result_expires=RESULT_EXPIRES_S,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


# kombu keeps a queue as one Redis list per priority step: the queue's name for priority 0,
# the name, a separator and the step for the others.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def pending_messages(client: redis.Redis, queue: str) -> int:
    """Messages waiting in Celery queue `queue` (not those a worker has taken)."""
    keys = [queue, *(f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS)]
    pipeline = client.pipeline(transaction=False)
    for key in keys:
        pipeline.llen(key)
    return sum(int(length) for length in pipeline.execute())
