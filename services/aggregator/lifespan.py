"""What the aggregator runs around serving: the round loop, and closing its HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.aggregator.rounds_loop import LOOP_NAME, RoundLoop
from tessera.service.housekeeping import add_housekeeping

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]


def extend_lifespan(app: FastAPI) -> None:
    """Wrap the service's lifespan: after its start-up, start the round loop; at shutdown, stop
    the loop and close the clustering client before the service closes its connections."""
    add_housekeeping(app, RoundLoop(), name=LOOP_NAME)
    inner: Lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        clustering_http = app.state.clustering_http  # tests may swap in another later
        async with inner(app) as state:
            try:
                yield state
            finally:
                clustering_http.close()

    app.router.lifespan_context = lifespan
