"""`tessera up`'s restart limit counts crashes within a time window, not over the stack's life."""

from __future__ import annotations

import threading
from pathlib import Path

import redis

from tessera import procs
from tessera.devstack import EmbeddedValkey, embedded_settings
from tessera.stack import RestartBudget, Stack


def test_crashes_far_apart_are_always_restarted() -> None:
    budget = RestartBudget(limit=5, window_s=600)

    allowed = [budget.take(now=hour * 3600.0) for hour in range(20)]

    assert all(allowed)


def test_a_crash_loop_is_left_down_for_good() -> None:
    budget = RestartBudget(limit=5, window_s=600)

    allowed = [budget.take(now=10.0 * n) for n in range(6)]
    later = budget.take(now=10_000.0)

    assert allowed == [True] * 5 + [False]
    assert later is False


def test_the_supervisor_restarts_a_killed_embedded_valkey(tmp_path: Path) -> None:
    stack = Stack(embedded_settings(tmp_path / "stack"))
    valkey = EmbeddedValkey(tmp_path / "valkey", persistent=True)
    url = valkey.start()
    stack.devstack.valkey = valkey
    supervisor = threading.Thread(target=stack.supervise, daemon=True)
    supervisor.start()
    try:
        first = valkey.process
        assert first is not None
        first.kill()  # SIGKILL, as a crash
        procs.wait_until(
            lambda: valkey.process is not first and _answers(url), timeout=30, what="Valkey back"
        )
    finally:
        stack.stop()
        supervisor.join(timeout=10)

    assert valkey.url == url  # the same port: clients reconnect where they were
    assert not supervisor.is_alive()


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False
    finally:
        client.close()
