"""ASGI middleware: request body limits (size, and time between its bytes), work in flight, and
request metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.metrics import HTTP_LATENCY, HTTP_REQUESTS

DRAIN_BYTES = 1024 * 1024
DRAIN_TIMEOUT_S = 2.0
"""How much of a refused body (past the limit), and for how long, is read and dropped so that
the connection can serve the next request; past that, the 413 closes the connection instead
(`Connection: close`)."""


class BodyTooLargeError(HTTPException):
    """A body over its limit: 413, closing the connection unless the rest of it was drained.

    An HTTPException, so that FastAPI's body parsing passes it on as it is (any other error
    there becomes a 400 "error parsing the body").
    """

    def __init__(self, limit: int, *, drained: bool) -> None:
        super().__init__(
            413,
            detail=f"request body is larger than the limit of {limit} bytes",
            headers=None if drained else {"Connection": "close"},
        )


class BodyStalledError(HTTPException):
    """A body that sent nothing for the read timeout: 408, and the connection is closed.

    An HTTPException for the same reason as BodyTooLargeError.
    """

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            detail=f"the request body sent nothing for {timeout_s:g} s "
            "(TESSERA_BODY_READ_TIMEOUT_S); send it again",
            headers={"Connection": "close"},
        )


class BodySizeLimitMiddleware:
    """Answer 413 to a body over its path's limit, whether or not it declares a length.

    The refused body is drained (up to DRAIN_BYTES past the limit) so that a keep-alive
    connection serves the next request; a longer one gets `Connection: close` and the server
    closes the connection, so that the client's next request goes on a new one.

    A body that sends nothing for `read_timeout_s` is a 408 (connection closed). The timeout
    covers the body only: once its last part has arrived, the app may wait on `receive` as
    long as it likes (a server-sent event stream waits there for the client to go).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        default_limit: int,
        limits_by_prefix: Mapping[str, int | Callable[[], int]],
        read_timeout_s: float,
    ) -> None:
        """A prefix's limit may be a function, called once on the first request under it."""
        self.app = app
        self.default_limit = default_limit
        self.limits_by_prefix = dict(limits_by_prefix)
        self.read_timeout_s = read_timeout_s

    def _limit_for(self, path: str) -> int:
        for prefix, limit in self.limits_by_prefix.items():
            if path.startswith(prefix):
                if callable(limit):
                    limit = self.limits_by_prefix[prefix] = limit()
                return limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            drained = int(declared) <= limit + DRAIN_BYTES and await _drain(
                receive, limit + DRAIN_BYTES
            )
            await _reject(send, BodyTooLargeError(limit, drained=drained))
            return
        received = 0
        body_done = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise BodyStalledError(self.read_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
                if received > limit:
                    drained = not more or await _drain(receive, limit + DRAIN_BYTES - received)
                    raise BodyTooLargeError(limit, drained=drained)
                body_done = not more
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLargeError, BodyStalledError) as error:  # where no handler answers it
            if not response_started:
                await _reject(send, error)


async def _drain(receive: Receive, budget: int) -> bool:
    """Read and drop the rest of a body, up to `budget` bytes and DRAIN_TIMEOUT_S; whether it
    ended within those."""
    try:
        return await asyncio.wait_for(_drop(receive, budget), DRAIN_TIMEOUT_S)
    except TimeoutError:
        return False


async def _drop(receive: Receive, budget: int) -> bool:
    dropped = 0
    while dropped <= budget:
        message = await receive()
        if message["type"] != "http.request":
            return False  # the client went away
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return dropped <= budget
    return False


async def _reject(send: Send, error: HTTPException) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    body = json.dumps({"detail": error.detail}).encode()
    await send({"type": "http.response.body", "body": body})


BUSY_RETRY_AFTER_S = 2
"""What a request refused for want of a turn is told to wait: turns come free in well under a
second each, and the refused client's retry comes back behind those already waiting."""
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class InFlightLimitMiddleware:
    """Work on at most `limit` requests at once; the others wait their turn up to `queue_s`,
    then get a 503 with Retry-After (never a 500 from a pool or a thread run dry).

    A request's turn ends when its response starts: a stream that outlives its handler (server
    sent events) does not hold one. Probes are never held back, so that readiness answers
    while the service is busy.
    """

    def __init__(self, app: ASGIApp, *, limit: int, queue_s: float) -> None:
        self.app = app
        self.limit = limit
        self.queue_s = queue_s
        self._turns: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def _semaphore(self) -> asyncio.Semaphore:
        """The turns of the running loop (a test client runs the app on one loop per block)."""
        loop = asyncio.get_running_loop()
        if loop not in self._turns:
            self._turns = {loop: asyncio.Semaphore(self.limit)}  # an earlier loop is done
        return self._turns[loop]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        turns = self._semaphore()
        if turns.locked():
            try:
                await asyncio.wait_for(turns.acquire(), self.queue_s)
            except TimeoutError:
                await _reject(send, self._busy())
                return
        else:
            await turns.acquire()  # free: returns at once
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                turns.release()

        async def releasing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, releasing_send)
        finally:
            release()

    def _busy(self) -> HTTPException:
        return HTTPException(
            503,
            detail=f"the service is busy ({self.limit} requests in flight, "
            f"TESSERA_MAX_REQUESTS_IN_FLIGHT); retry after {BUSY_RETRY_AFTER_S} s",
            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
        )


class MetricsMiddleware:
    """Count and time requests by route template (not raw path, to bound label cardinality)."""

    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope["method"]
            HTTP_REQUESTS.labels(self.service, method, template, str(status)).inc()
            HTTP_LATENCY.labels(self.service, method, template).observe(
                time.perf_counter() - started
            )
