"""The worker's Celery app. Run with `celery -A services.worker.app worker`.

Building the app reads settings but connects to nothing; Celery connects when the worker starts.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from services.worker import context
from tessera.config import get_settings
from tessera.logs import configure_logging
from tessera.queue import make_celery
from tessera.worker_metrics import connect as connect_metrics

TASK_MODULES = [
    "services.worker.tasks.system",
    "services.worker.tasks.federation",
    "services.worker.tasks.clustering",
]


def create_worker_app() -> Celery:
    settings = get_settings()
    configure_logging(settings, service="worker")
    app = make_celery(settings, main="tessera-worker")
    app.conf.include = TASK_MODULES
    return app


@worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    # A forked pool process must not reuse the parent's database connections.
    context.reset_after_fork()


@worker_process_shutdown.connect
def _on_shutdown(**_kwargs: Any) -> None:
    context.close()


connect_metrics("worker")
app = create_worker_app()
