"""A worker's heartbeat: a thread that says "still running" while a task runs.

The aggregator's round loop takes a task whose heartbeat is older than TESSERA_TASK_STALE_S to
have lost its worker, and queues it again; so a worker killed mid-task is replaced within about
that long, not after Redis's visibility timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)

# Beats per stale period: a missed beat or two never makes a live task look dead.
BEATS_PER_STALE_PERIOD = 4


class Heartbeat:
    """Call `beat` every `interval_s` seconds in a daemon thread, from `with` until its end."""

    def __init__(self, beat: Callable[[], object], *, interval_s: float, name: str) -> None:
        self._beat = beat
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @classmethod
    def for_stale_after(cls, beat: Callable[[], object], *, stale_s: float, name: str) -> Heartbeat:
        """A heartbeat that beats often enough for a task never to look stale while it runs."""
        return cls(beat, interval_s=stale_s / BEATS_PER_STALE_PERIOD, name=name)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._beat()
            except Exception as error:  # a missed beat is retried at the next one
                log.warning("heartbeat failed", extra={"error": str(error)})
