"""The aggregator's round loop: the one place that makes every round finish.

Each pass (every TESSERA_HOUSEKEEPING_INTERVAL_S, in every aggregator replica): move secure
rounds through their phases (`secagg`), close the collecting rounds past their deadline or at
quorum (`closing`), queue again the aggregating rounds and the re-clustering jobs whose worker
died (`stuck`, `services.clustering.jobs`), queue a re-clustering when the clusters drifted
(TESSERA_CLUSTER_DRIFT_SHARE), delete the raw updates of rounds over for
TESSERA_UPDATE_RETENTION_DAYS (`retention`) and, every ORPHAN_SWEEP_INTERVAL_S, delete update
objects that no row names and abort uploads whose slot expired (`orphans`), and the masked
inputs of failed secure rounds.
"""

from __future__ import annotations

import time
from typing import Any

from services.aggregator.closing import close_due_rounds
from services.aggregator.orphans import (
    ORPHAN_SWEEP_INTERVAL_S,
    abort_abandoned_uploads,
    sweep_orphaned_updates,
)
from services.aggregator.retention import delete_expired_updates
from services.aggregator.secagg import advance_secure_rounds, forget_failed_inputs
from services.aggregator.stuck import requeue_stale_rounds
from services.clustering.jobs import queue_drift_job, requeue_stale_jobs
from tessera.service.resources import Resources

LOOP_NAME = "round-loop"


class RoundLoop:
    """One pass of the loop; remembers when it last swept orphans."""

    def __init__(self) -> None:
        self._swept_at: float | None = None

    def __call__(self, resources: Resources) -> dict[str, Any]:
        # Secure rounds first: their deadline and phases close them, never an update count.
        closed = advance_secure_rounds(sessions=resources.sessions, celery=resources.celery)
        closed += close_due_rounds(sessions=resources.sessions, celery=resources.celery)
        stuck = requeue_stale_rounds(
            sessions=resources.sessions,
            celery=resources.celery,
            stale_s=resources.settings.task_stale_s,
        )
        jobs = requeue_stale_jobs(
            sessions=resources.sessions,
            celery=resources.celery,
            stale_s=resources.settings.task_stale_s,
        )
        drift_job = queue_drift_job(
            sessions=resources.sessions,
            celery=resources.celery,
            share_limit=resources.settings.cluster_drift_share,
            similarity=resources.settings.cluster_drift_similarity,
        )
        expired = delete_expired_updates(
            sessions=resources.sessions,
            store=resources.store,
            retention_days=resources.settings.update_retention_days,
        )
        swept: list[str] = []
        aborted: list[str] = []
        now = time.monotonic()
        if self._swept_at is None or now - self._swept_at >= ORPHAN_SWEEP_INTERVAL_S:
            self._swept_at = now
            swept = sweep_orphaned_updates(sessions=resources.sessions, store=resources.store)
            forget_failed_inputs(sessions=resources.sessions, store=resources.store)
            aborted = abort_abandoned_uploads(
                store=resources.store, older_than_s=resources.settings.upload_slot_expiry_s
            )
        return {
            "closed": closed,
            **stuck,
            "clustering_jobs_requeued": jobs["requeued"],
            "clustering_jobs_failed": jobs["failed"],
            "drift_job": drift_job,
            "updates_deleted": expired,
            "orphans": swept,
            "abandoned_uploads": aborted,
        }
