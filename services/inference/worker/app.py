"""The inference worker's Celery app. Run with
`celery -A services.inference.worker.app worker --queues inference`.

Each pool process loads the base model and starts its adapter cache and its "adapter
published" listener at start (not at the first job); building the app connects to nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from services.inference.worker import runtime
from tessera.config import get_settings
from tessera.events import INFERENCE_QUEUE
from tessera.logs import configure_logging
from tessera.queue import make_celery
from tessera.worker_metrics import connect as connect_metrics

log = logging.getLogger(__name__)

TASK_MODULES = ["services.inference.worker.tasks"]
# A pool process reports "up" only after its start-up hook: loading a real base model (onto a
# GPU) takes far longer than Celery's default of 4 s.
PROCESS_START_TIMEOUT_S = 300


def create_inference_worker_app() -> Celery:
    settings = get_settings()
    configure_logging(settings, service="inference-worker")
    app = make_celery(settings, main="tessera-inference")
    app.conf.include = TASK_MODULES
    app.conf.task_default_queue = INFERENCE_QUEUE
    app.conf.worker_proc_alive_timeout = PROCESS_START_TIMEOUT_S
    return app


@worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    runtime.reset_after_fork()
    try:
        runtime.runtime()  # model, cache and listener ready before the first job arrives
    except Exception:
        # A backend down at start: the first job tries again (and retries while it is down).
        log.exception("inference runtime not ready at start")


@worker_process_shutdown.connect
def _on_shutdown(**_kwargs: Any) -> None:
    runtime.close()


connect_metrics("inference-worker")
app = create_inference_worker_app()
