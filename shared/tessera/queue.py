"""The Celery application, built from settings: the one place its configuration lives."""

from __future__ import annotations

from celery import Celery

from tessera.config import Settings
from tessera.events import AGGREGATION_QUEUE

# A result or a message past this is dropped by Redis; long enough for a slow day.
RESULT_EXPIRES_S = 24 * 3600


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
        broker_transport_options={"visibility_timeout": settings.task_time_limit_s + 300},
        result_backend_transport_options={"visibility_timeout": settings.task_time_limit_s + 300},
        result_expires=RESULT_EXPIRES_S,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app
