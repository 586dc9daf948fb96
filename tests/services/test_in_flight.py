"""Work in flight is bounded: past the limit a request waits its turn, then gets a 503 with
Retry-After; probes never wait, and a stream holds no turn once its response has started."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from tessera.service.middleware import BUSY_RETRY_AFTER_S, InFlightLimitMiddleware
from tests.serving import served

QUEUE_S = 2.0

pytestmark = pytest.mark.xdist_group("timed")


@pytest.fixture
def app_url() -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """An app with one turn: `/slow` holds it (and sets the second event) until the first is
    set; `/stream` streams until then; `/fast` answers at once."""
    release, holding = threading.Event(), threading.Event()
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        holding.set()
        while not release.is_set():
            await asyncio.sleep(0.02)
        return {"ok": True}

    @app.get("/fast")
    async def fast() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first\n"
            while not release.is_set():
                await asyncio.sleep(0.02)
            yield b"last\n"

        return StreamingResponse(chunks())

    app.add_middleware(InFlightLimitMiddleware, limit=1, queue_s=QUEUE_S)
    with served(app) as url:
        yield url, release, holding
        release.set()


def _in_background(url: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: httpx.get(url, timeout=30))
    thread.start()
    return thread


def test_past_the_limit_a_request_waits_then_gets_503_with_retry_after(
    app_url: tuple[str, threading.Event, threading.Event],
) -> None:
    url, release, holding = app_url
    holder = _in_background(f"{url}/slow")
    assert holding.wait(10)  # the slow request holds the only turn
    busy = httpx.get(f"{url}/fast", timeout=10)
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == str(BUSY_RETRY_AFTER_S)
    assert "TESSERA_MAX_REQUESTS_IN_FLIGHT" in busy.json()["detail"]
    assert httpx.get(f"{url}/healthz", timeout=1).status_code == 200  # probes never wait
    release.set()
    holder.join()
    assert httpx.get(f"{url}/fast", timeout=10).status_code == 200  # the turn came back


def test_a_request_within_its_wait_gets_the_turn(
    app_url: tuple[str, threading.Event, threading.Event],
) -> None:
    url, release, holding = app_url
    holder = _in_background(f"{url}/slow")
    assert holding.wait(10)
    threading.Timer(QUEUE_S / 10, release.set).start()
    assert httpx.get(f"{url}/fast", timeout=10).status_code == 200
    holder.join()


def test_a_started_stream_holds_no_turn(
    app_url: tuple[str, threading.Event, threading.Event],
) -> None:
    url, release, _holding = app_url
    with httpx.stream("GET", f"{url}/stream", timeout=10) as streaming:
        lines = streaming.iter_lines()
        assert next(lines) == "first"
        assert httpx.get(f"{url}/fast", timeout=10).status_code == 200  # while it streams
        release.set()
        assert next(lines) == "last"
