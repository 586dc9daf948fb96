"""The generation task: takes a job id, runs it on this process's model and adapter cache.

Late acknowledgement (from the app): a worker killed mid-job leaves the message to be
delivered again, and the job runs again from the start; a job already finished is skipped.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from services.inference.queue_depth import record_queue_depth
from services.inference.worker import runtime as process
from services.inference.worker.runner import TRANSIENT_ERRORS, fail_job, run_generation
from tessera.events import TASK_GENERATE

log = logging.getLogger(__name__)

MAX_RETRIES = 3
RETRY_BACKOFF_S = 5  # doubled at each retry: 5, 10, 20 s


@shared_task(bind=True, name=TASK_GENERATE, max_retries=MAX_RETRIES, acks_late=True)
def generate_job(self: Task, job_id: str) -> dict[str, Any]:
    """Run generation job `job_id` (safe to run again); connection errors are retried."""
    runtime = process.runtime()
    if runtime.redis is not None:
        record_queue_depth(runtime.redis)
    try:
        return run_generation(job_id, runtime=runtime)
    except TRANSIENT_ERRORS as error:
        retries = self.request.retries
        if retries < MAX_RETRIES:
            raise self.retry(exc=error, countdown=RETRY_BACKOFF_S * 2**retries) from error
        try:
            fail_job(
                job_id,
                f"gave up after {retries} retries: {type(error).__name__}: {error}",
                runtime=runtime,
            )
        except Exception:
            log.exception("could not mark the job failed", extra={"job_id": job_id})
        raise
