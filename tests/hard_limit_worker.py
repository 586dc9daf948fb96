"""The aggregation worker's Celery app without a soft time limit, for fault tests: a task over
its time limit is killed by the hard limit alone, as happens when the soft limit's exception
cannot stop it in time (a long native call). Run with `celery -A tests.hard_limit_worker`."""

from __future__ import annotations

from services.worker.app import app

app.conf.task_soft_time_limit = None
