"""HTTP with retries for edge devices: flaky links are the normal case, not the exception."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRY_ERRORS = (httpx.TransportError,)


class ApiError(RuntimeError):
    """A request the server refused (4xx) or kept failing (5xx after every retry)."""

    def __init__(self, method: str, url: str, status: int, detail: Any):
        self.method = method
        self.url = url
        self.status = status
        self.detail = detail
        super().__init__(f"{method} {url}: {status} {detail}")

    def __reduce__(self) -> tuple[type[ApiError], tuple[str, str, int, Any]]:
        # Crosses process boundaries (the simulator's device pool) with its fields intact.
        return (type(self), (self.method, self.url, self.status, self.detail))


@dataclass
class Traffic:
    """Bytes this client sent and received (request and response bodies)."""

    up: int = 0
    down: int = 0


@dataclass
class RetryPolicy:
    """Up to `attempts` tries with exponential backoff and jitter, capped at `max_delay_s`; a
    server's `Retry-After` (on 429 and 503) is waited for instead, up to `max_retry_after_s`."""

    attempts: int = 5
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    max_retry_after_s: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before try `attempt + 1` (attempt counts from 0)."""
        asked = _seconds(retry_after)
        if asked is not None:
            return min(asked, self.max_retry_after_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)


def _seconds(retry_after: str | None) -> float | None:
    """A `Retry-After` value (delay-seconds or an HTTP date) in seconds; None if absent or bad."""
    if not retry_after:
        return None
    if retry_after.strip().isdigit():
        return float(retry_after.strip())
    try:
        when = parsedate_to_datetime(retry_after)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def request(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    policy: RetryPolicy,
    traffic: Traffic | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """Send, retrying transport errors and retryable statuses; raise ApiError on a refusal.

    Safe for PUT of an update because the server treats a re-upload as a replacement: an
    interrupted upload resumes by sending the whole file again.
    """
    last: Exception | None = None
    for attempt in range(policy.attempts):
        retry_after = None
        try:
            response = client.request(method, url, **kwargs)
        except RETRY_ERRORS as error:
            last = error
            log.warning("%s %s failed (%s), attempt %d", method, url, error, attempt + 1)
        else:
            if traffic is not None:
                traffic.up += len(response.request.content or b"")
                traffic.down += len(response.content)
            last, retry_after = _judge(method, url, response, attempt)
            if last is None:
                return response
        if attempt + 1 < policy.attempts:
            policy.sleep(policy.delay(attempt, retry_after))
    raise _gave_up(method, url, policy, last)


async def request_async(
    client: httpx.AsyncClient, method: str, url: str, *, policy: RetryPolicy, **kwargs: Any
) -> httpx.Response:
    """`request` on an event loop (many simulated devices in one process): the same retries,
    waits (asyncio's sleep, not `policy.sleep`) and errors."""
    last: Exception | None = None
    for attempt in range(policy.attempts):
        retry_after = None
        try:
            response = await client.request(method, url, **kwargs)
        except RETRY_ERRORS as error:
            last = error
            log.warning("%s %s failed (%s), attempt %d", method, url, error, attempt + 1)
        else:
            last, retry_after = _judge(method, url, response, attempt)
            if last is None:
                return response
        if attempt + 1 < policy.attempts:
            await asyncio.sleep(policy.delay(attempt, retry_after))
    raise _gave_up(method, url, policy, last)


def _judge(
    method: str, url: str, response: httpx.Response, attempt: int
) -> tuple[ApiError | None, str | None]:
    """(None, None) for a success; for a retryable answer, its error and `Retry-After` (on 429
    and 503); ApiError raised for a refusal."""
    if response.status_code < 400:
        return None, None
    error = ApiError(method, url, response.status_code, _detail(response))
    if response.status_code not in RETRY_STATUSES:
        raise error
    log.warning("%s %s answered %d, attempt %d", method, url, response.status_code, attempt + 1)
    retry_after = None
    if response.status_code in (429, 503):
        retry_after = response.headers.get("Retry-After")
    return error, retry_after


def _gave_up(method: str, url: str, policy: RetryPolicy, last: Exception | None) -> ApiError:
    assert last is not None
    if isinstance(last, ApiError):
        return last
    return ApiError(method, url, 0, f"unreachable after {policy.attempts} attempts: {last}")


def _detail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    return body.get("detail", body) if isinstance(body, dict) else body
