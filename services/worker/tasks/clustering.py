"""Clustering task: run a queued re-clustering job (`services.worker.clustering`)."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from services.worker import context
from services.worker.clustering import ClusteringScale, run_clustering_job
from services.worker.rounds import TRANSIENT_ERRORS
from services.worker.tasks.federation import MAX_RETRIES, RETRY_BACKOFF_S
from tessera.events import TASK_RECLUSTER


@shared_task(bind=True, name=TASK_RECLUSTER, max_retries=MAX_RETRIES)
def recluster(self: Task, job_id: int) -> dict[str, Any]:
    """Recluster every enabled device for a queued job; connection errors retried with backoff
    (after the last retry the job waits queued, and the round loop sends it again)."""
    resources = context.resources()
    try:
        return run_clustering_job(
            job_id,
            sessions=resources.sessions,
            scale=ClusteringScale.from_settings(resources.settings),
            stale_s=resources.settings.task_stale_s,
        )
    except TRANSIENT_ERRORS as error:
        retries = self.request.retries
        if retries < MAX_RETRIES:
            raise self.retry(exc=error, countdown=RETRY_BACKOFF_S * 2**retries) from error
        raise
