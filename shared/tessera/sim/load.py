"""Many devices at once over async HTTP, without training: each enrols, sends its task vectors
and one update into a round. What the load benchmark (`bench/load.py`) and its test drive."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np

from tessera.sdk.http import ApiError, RetryPolicy, request_async

STEPS = ("enrol", "task_vectors", "update")
T = TypeVar("T")


@dataclass(frozen=True)
class DevicePayloads:
    """What each device sends: task vectors of the federation's encoder, and an update file
    (device i sends `updates[i % len(updates)]`)."""

    encoder_id: str
    width: int
    updates: Sequence[bytes]

    def vectors(self, index: int) -> list[list[float]]:
        vector = np.random.default_rng(index).standard_normal(self.width)
        return [(vector / np.linalg.norm(vector)).tolist()]


@dataclass
class LoadReport:
    """Per step, each device's time to success (retries included) and when the step's last
    success came (from the run's start: its rate is successes over that); every answer's
    status (those retried too) and every request that got none; the operations that gave up;
    the updates the server accepted."""

    devices: int
    wall_s: float = 0.0
    seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STEPS})
    last_done_s: dict[str, float] = field(default_factory=dict)  # step -> its last success
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    transport_errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (step, type)
    failures: Counter[tuple[str, int]] = field(default_factory=Counter)
    accepted: dict[int, str] = field(default_factory=dict)  # client id -> update sha256

    @property
    def finished(self) -> int:
        return len(self.accepted)

    def errors(self) -> int:
        """Operations that failed after every retry (what a device sees as an error)."""
        return sum(self.failures.values())

    def answered(self, status: int) -> int:
        return sum(n for (_, code), n in self.statuses.items() if code == status)

    def summary(self) -> dict[str, Any]:
        """Rates, latency percentiles per step, statuses and failures, for a table."""
        steps = {}
        for step, samples in self.seconds.items():
            steps[step] = {
                "done": len(samples),
                "per_s": len(samples) / self.last_done_s[step] if samples else 0.0,
                **{f"p{q}_s": percentile(samples, q) for q in (50, 95, 99)},
            }
        return {
            "devices": self.devices,
            "finished": self.finished,
            "wall_s": self.wall_s,
            "steps": steps,
            "statuses": {f"{s} {c}": n for (s, c), n in sorted(self.statuses.items())},
            "transport_errors": {
                f"{s} {kind}": n for (s, kind), n in sorted(self.transport_errors.items())
            },
            "failures": {f"{s} {c}": n for (s, c), n in sorted(self.failures.items())},
        }


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank); NaN without samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class _CountingTransport(httpx.AsyncHTTPTransport):
    """Counts each request that got no answer (a reset connection, a timeout) by step and
    error type, before the retry policy sees it."""

    def __init__(self, report: LoadReport, **options: Any) -> None:
        super().__init__(**options)
        self.report = report

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.TransportError as error:
            self.report.transport_errors[(_step(request), type(error).__name__)] += 1
            raise


def _step(request: httpx.Request) -> str:
    path = request.url.path
    if path.endswith("/task-vectors"):
        return "task_vectors"
    return "update" if "/updates/" in path else "enrol"


async def run_devices(
    *,
    url: str,
    operator_token: str,
    round_id: int,
    payloads: DevicePayloads,
    devices: int,
    name_prefix: str,
    policy: RetryPolicy | None = None,
    timeout_s: float = 300.0,
    lockstep: bool = False,
) -> LoadReport:
    """`devices` simulated devices, all at once, each on its own connection. `lockstep`: every
    device starts each step at the same moment, once all have finished the one before (the
    hardest arrival pattern for the server); otherwise each goes on at its own pace."""
    policy = policy or RetryPolicy(attempts=10)
    report = LoadReport(devices=devices)

    async def record(response: httpx.Response) -> None:
        report.statuses[(_step(response.request), response.status_code)] += 1

    limits = httpx.Limits(max_connections=devices, max_keepalive_connections=devices)
    async with httpx.AsyncClient(
        base_url=url,
        transport=_CountingTransport(report, limits=limits),
        timeout=httpx.Timeout(timeout_s),
        event_hooks={"response": [record]},
    ) as client:

        async def timed(step: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
            started = time.perf_counter()
            try:
                response = await request_async(client, method, path, policy=policy, **kwargs)
            except ApiError as error:
                report.failures[(step, error.status)] += 1
                raise
            done = time.perf_counter()
            report.seconds[step].append(done - started)
            report.last_done_s[step] = done - run_started
            return response

        async def enrol(index: int) -> tuple[int, int, str]:
            enrolled = await timed(
                "enrol",
                "POST",
                "/v1/clients",
                json={"name": f"{name_prefix}-{index}", "role": "device"},
                headers={"Authorization": f"Bearer {operator_token}"},
            )
            return index, enrolled.json()["id"], enrolled.json()["token"]

        async def send_vectors(index: int, client_id: int, token: str) -> tuple[int, int, str]:
            await timed(
                "task_vectors",
                "POST",
                "/v1/devices/me/task-vectors",
                json={"encoder_id": payloads.encoder_id, "vectors": payloads.vectors(index)},
                headers={"Authorization": f"Bearer {token}"},
            )
            return index, client_id, token

        async def upload(index: int, client_id: int, token: str) -> None:
            receipt = await timed(
                "update",
                "PUT",
                f"/v1/rounds/{round_id}/updates/{client_id}",
                content=payloads.updates[index % len(payloads.updates)],
                params={"num_samples": 16},
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/octet-stream",
                },
            )
            report.accepted[client_id] = receipt.json()["sha256"]

        async def device(index: int) -> None:
            await upload(*await send_vectors(*await enrol(index)))

        run_started = time.perf_counter()
        if lockstep:
            enrolled = await _settled(enrol(i) for i in range(devices))
            sent = await _settled(send_vectors(*one) for one in enrolled)
            await _settled(upload(*one) for one in sent)
        else:
            await _settled(device(i) for i in range(devices))
        report.wall_s = time.perf_counter() - run_started
    return report


async def _settled(steps: Iterable[Awaitable[T]]) -> list[T]:
    """Run `steps` at once; the results of those that succeeded. An ApiError (a step that gave
    up, counted already) drops its device; any other error is a bug here, raised."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, ApiError):
            raise result
    return [result for result in results if not isinstance(result, BaseException)]
