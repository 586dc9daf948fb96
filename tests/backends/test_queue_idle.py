"""A worker that sat idle longer than the broker's socket timeout still takes the next task."""

from __future__ import annotations

import time

import pytest

from tessera.config import Settings
from tessera.events import TASK_PING
from tessera.queue import SOCKET_TIMEOUT_S, make_celery

# A wall-clock bound: under pytest-xdist these modules run one at a time, on one worker.
pytestmark = pytest.mark.xdist_group("timed")


@pytest.mark.slow
@pytest.mark.usefixtures("worker")
def test_an_idle_worker_outlives_the_socket_timeout(settings: Settings) -> None:
    app = make_celery(settings)
    assert app.send_task(TASK_PING, args=["before"]).get(timeout=30)["payload"] == "before"

    time.sleep(2 * SOCKET_TIMEOUT_S + 1)  # BRPOP and the control channel wait this long idle
    started = time.monotonic()
    after = app.send_task(TASK_PING, args=["after"]).get(timeout=30)
    took = time.monotonic() - started
    app.close()

    assert after["payload"] == "after"
    assert took < SOCKET_TIMEOUT_S
