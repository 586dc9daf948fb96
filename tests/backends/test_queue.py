"""A Celery task makes the round trip through Redis to a real worker process and back."""

from __future__ import annotations

import pytest

from tessera.config import Settings
from tessera.events import TASK_PING
from tessera.queue import make_celery


@pytest.mark.usefixtures("worker")
def test_ping_task_round_trip(settings: Settings) -> None:
    app = make_celery(settings)

    result = app.send_task(TASK_PING, args=["hello"]).get(timeout=30)
    app.close()

    assert result["payload"] == "hello"
    assert result["database"] == "ok"


def test_celery_is_configured_for_long_jobs(settings: Settings) -> None:
    app = make_celery(settings)

    conf = app.conf

    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def test_make_celery_needs_a_redis_url() -> None:
    with pytest.raises(ValueError, match="TESSERA_REDIS_URL"):
        make_celery(Settings(redis_url=None))
