"""The Celery application, built from settings: the one place its configuration lives."""

from __future__ import annotations

from celery import Celery

from tessera.config import Settings
from tessera.events import AGGREGATION_QUEUE

# A result or a message past this is dropped by Redis; long enough for a slow day.
RESULT_EXPIRES_S = 24 * 3600
# A request that sends a task answers 503 within about a second while Redis refuses connections
# (Celery's defaults reconnected the result backend 20 times, 1 s apart), and within 15 s while
# it hangs (no socket timeout: forever). Idle workers are unaffected: BRPOP waits 1 s at a time.
CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 5.0
_QUICK_RETRIES = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def make_celery(settings: Settings, *, main: str = "tessera") -> Celery:
    """A Celery app on the Redis in `settings`; connects lazily, on first use."""
    if not settings.redis_url:
        raise ValueError(
            "TESSERA_REDIS_URL is not set: configure a Redis server, or start the stack "
            "with `tessera up`, which starts an embedded Valkey"
        )
    app = Celery(main, broker=settings.redis_url, backend=settings.redis_url)
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
        # Redis redelivers an unacknowledged message after this; it must outlast any task.
        broker_transport_options={
            "visibility_timeout": settings.task_time_limit_s + 300,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": SOCKET_TIMEOUT_S,
        },
        result_backend_transport_options={
            "visibility_timeout": settings.task_time_limit_s + 300,
            "retry_policy": _QUICK_RETRIES,
        },
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        task_publish_retry_policy=_QUICK_RETRIES,
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        redis_socket_timeout=SOCKET_TIMEOUT_S,
        result_expires=RESULT_EXPIRES_S,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app
