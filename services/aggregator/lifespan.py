"""What the aggregator runs around serving: the deadline loop, and closing its HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.aggregator.closing import deadline_loop

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


def extend_lifespan(app: FastAPI) -> None:
    """Wrap the service's lifespan: after its start-up, start the deadline loop; at shutdown,
    stop the loop and close the clustering client before the service closes its connections."""
    inner: Lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            clustering_http = app.state.clustering_http  # tests may swap in another later
            loop = asyncio.create_task(deadline_loop(app.state.resources), name="deadline-loop")
            try:
                yield state
            finally:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
                clustering_http.close()

    app.router.lifespan_context = lifespan
