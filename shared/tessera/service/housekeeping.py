"""A service's housekeeping loop: one function run every TESSERA_HOUSEKEEPING_INTERVAL_S.

The aggregator's checks rounds (deadlines, quorum, stuck rounds, orphans); the inference API's
checks stalled generation jobs. Each pass runs in a thread (the work is blocking database and
Redis calls) and an error in one pass is logged, never the end of the loop. Every replica runs
its own loop: the work is made of conditional UPDATEs, so replicas never move a row twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from tessera.service.resources import Resources

log = logging.getLogger(__name__)

Work = Callable[[Resources], object]


async def housekeeping_loop(resources: Resources, work: Work, *, name: str) -> None:
    """Run `work` now and then every TESSERA_HOUSEKEEPING_INTERVAL_S, until cancelled."""
    while True:
        try:
            await asyncio.to_thread(work, resources)
        except Exception:
            log.exception("housekeeping pass failed", extra={"loop": name})
        await asyncio.sleep(resources.settings.housekeeping_interval_s)


def add_housekeeping(app: FastAPI, work: Work, *, name: str) -> None:
    """Run `work` in a housekeeping loop from the end of the app's start-up to its shutdown."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            task = asyncio.create_task(
                housekeeping_loop(app.state.resources, work, name=name), name=name
            )
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan
