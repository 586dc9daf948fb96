"""The generation task: a wake-up that runs the next queued job in fair order on this
process's model and adapter cache (`runner.run_next`).

Late acknowledgement (from the app): a message whose worker dies is delivered again, at once if
only the pool process died, after Redis's visibility timeout if the whole worker did. A
redelivered message first puts back in the queue the job its earlier delivery started, if no
one has run it since (`runner.reclaim`); otherwise the stalled-job loop does that within
TESSERA_TASK_STALE_S. Connection errors put the job back in the queue and retry the message
with backoff; the last retry fails the job it ran.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from services.inference.messages import send_wakeup
from services.inference.queue_depth import record_queue_depth
from services.inference.worker import runtime as process
from services.inference.worker.runner import TRANSIENT_ERRORS, reclaim, run_next
from tessera.events import TASK_GENERATE

log = logging.getLogger(__name__)

MAX_RETRIES = 3
RETRY_BACKOFF_S = 5  # doubled at each retry: 5, 10, 20 s


@shared_task(bind=True, name=TASK_GENERATE, max_retries=MAX_RETRIES, acks_late=True)
def generate_job(self: Task, job_id: str) -> dict[str, Any]:
    """Run the next queued job, fairly (`job_id`: the job this message was sent for, which is
    queued or already taken); connection errors are retried."""
    runtime = process.runtime()
    if runtime.redis is not None:
        record_queue_depth(runtime.redis)
    retries = self.request.retries
    message_id = self.request.id
    if (self.request.delivery_info or {}).get("redelivered"):
        for back in reclaim(message_id, runtime=runtime)[1:]:
            send_wakeup(self.app, back)  # its batch's jobs; this message runs the first
    try:
        return run_next(runtime=runtime, give_up=retries >= MAX_RETRIES, message_id=message_id)
    except TRANSIENT_ERRORS as error:
        if retries < MAX_RETRIES:
            raise self.retry(exc=error, countdown=RETRY_BACKOFF_S * 2**retries) from error
        log.error("generation gave up", extra={"sent_for": job_id, "error": str(error)})
        raise
