"""Progress streams on a real server: many followers hold no threads, a cap per client, and
every stream ends with a final event (the job's, or `end` at its time limit or when the server
shuts down)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
import redis.asyncio as aioredis
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from services.inference.api.main import create_app
from services.inference.api.progress_stream import SHUTDOWN_GRACE_S, SHUTTING_DOWN, job_events
from services.inference.api.views import job_view
from tessera.config import Settings
from tessera.events import generation_channel
from tessera.models import GenerationJob, JobState, Role
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.inference.helpers import embeds_b64, make_client, tokens
from tests.serving import served, served_process

# A wall-clock bound: under pytest-xdist these modules run one at a time, on one worker.
pytestmark = pytest.mark.xdist_group("timed")

CLIENTS = 10
STREAMS_PER_CLIENT = 10  # 100 followers in all


async def _first_event(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """The first (event, data) of a stream."""
    return await _next_event(response.aiter_lines())


async def _next_event(lines: Any) -> tuple[str, dict[str, Any]]:
    event, data = "message", ""
    async for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data += line.split(":", 1)[1].strip()
        elif line == "" and data:
            return event, json.loads(data)
    raise AssertionError("the stream ended without an event")


async def _follow_to_the_end(
    http: httpx.AsyncClient, job_id: str, token: str, opened: asyncio.Event, count: list[int]
) -> list[tuple[str, dict[str, Any]]]:
    """Open a stream, report its first event, then read it until the server ends it."""
    async with http.stream(
        "GET", f"/v1/generations/{job_id}/events", headers=bearer(token)
    ) as response:
        assert response.status_code == 200, await response.aread()
        lines = response.aiter_lines()
        events = [await _next_event(lines)]
        count[0] += 1
        if count[0] == CLIENTS * STREAMS_PER_CLIENT:
            opened.set()
        while events[-1][0] == "progress":
            events.append(await _next_event(lines))
        async for _ in lines:  # the server closes the stream after its final event
            pass
    return events


def _queued_job(http: httpx.Client, token: str) -> str:
    body = {"prompt_embeds": embeds_b64(tokens(1)), "adapters": [], "steps": 4, "seed": 1}
    response = http.post("/v1/generations", json=body, headers=bearer(token))
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


@pytest.mark.slow
@pytest.mark.usefixtures("worker")  # a worker of the inference queue: /readyz is ready
def test_a_hundred_followers_leave_readiness_and_sync_routes_answering(
    settings: Settings, base_settings: Settings, sessions: sessionmaker[Session], session: Session
) -> None:
    # A short body timeout too: it must not cut streams that wait on `receive` for seconds.
    # The session's Redis database, where the session's worker consumes the inference queue
    # (it drops these jobs' messages: the test ends the jobs itself).
    limits = {
        "max_streams_per_client": STREAMS_PER_CLIENT,
        "body_read_timeout_s": 0.5,
        "redis_url": base_settings.redis_url,
    }
    settings = settings.model_copy(update=limits)
    broker = redis.Redis.from_url(base_settings.redis_url or "")
    clients = [make_client(session, settings, Role.GENERATOR) for _ in range(CLIENTS)]
    with served(create_app(settings)) as url:
        with httpx.Client(base_url=url) as sync_http:
            jobs = [_queued_job(sync_http, token) for _, token in clients]
            # The first worker check asks every worker (a second); the next ask the one found.
            warm = sync_http.get("/readyz", timeout=30)

        async def scenario() -> tuple[list[Any], list[float], int]:
            limits = httpx.Limits(max_connections=200)
            timeout = httpx.Timeout(30.0)
            async with (
                httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http,
                httpx.AsyncClient(base_url=url, timeout=timeout) as probe,
            ):
                opened, count = asyncio.Event(), [0]
                followers = [
                    asyncio.create_task(_follow_to_the_end(http, job_id, token, opened, count))
                    for job_id, (_, token) in zip(jobs, clients, strict=True)
                    for _ in range(STREAMS_PER_CLIENT)
                ]
                await asyncio.wait_for(opened.wait(), 60)
                one_more = await probe.get(
                    f"/v1/generations/{jobs[0]}/events", headers=bearer(clients[0][1])
                )
                # Six rounds over more than the streams' row-refresh period: every stream
                # polls its row and its Redis channel meanwhile.
                latencies = []
                for _ in range(6):
                    for path in ("/readyz", f"/v1/generations/{jobs[1]}"):
                        started = time.perf_counter()
                        answer = await probe.get(path, headers=bearer(clients[1][1]))
                        latencies.append(time.perf_counter() - started)
                        assert answer.status_code == 200, answer.text
                    await asyncio.sleep(0.6)
                for job_id in jobs:  # each job fails, as a worker would report it
                    with sessions() as own:
                        crud.finish_job(
                            session=own, job_id=job_id, state=JobState.FAILED, error="stopped"
                        )
                    event = {"id": job_id, "state": "failed", "step": 0, "total_steps": 4}
                    broker.publish(generation_channel(job_id), json.dumps(event))
                results = await asyncio.wait_for(asyncio.gather(*followers), 60)
                return results, latencies, one_more.status_code

        results, latencies, refused = anyio.run(scenario)
        again = httpx.get(
            f"{url}/v1/generations/{jobs[0]}/events", headers=bearer(clients[0][1]), timeout=30
        )

    assert refused == 429  # the 11th stream of one client
    assert max(latencies) < 1.0, latencies
    assert len(results) == CLIENTS * STREAMS_PER_CLIENT
    for events in results:
        assert events[0][0] == "progress" and events[0][1]["state"] == "queued"
        assert events[-1][0] == "failed" and events[-1][1]["error"] == "stopped"
    # Every slot was given back: the client can follow again (the job is over: one event).
    assert again.status_code == 200 and "\nevent: failed\r\n" in again.text
    assert all(broker.zcard(f"tessera:streams:{client_id}") == 0 for client_id, _ in clients)
    assert warm.status_code == 200, warm.text
    broker.close()


def test_a_stream_past_its_time_limit_ends_with_an_end_event(
    settings: Settings, sessions: sessionmaker[Session], session: Session, store: ObjectStore
) -> None:
    client_id, _ = make_client(session, settings, Role.GENERATOR)
    job = GenerationJob(
        id="job-time-limit",
        client_id=client_id,
        state=JobState.QUEUED,
        params={"steps": 4, "guidance": 5.0, "seed": 1, "size": 32, "num_images": 1},
        total_steps=4,
    )
    session.add(job)
    session.commit()

    def read_job() -> Any:
        with sessions() as own:
            row = own.get(GenerationJob, job.id)
            return None if row is None else job_view(row, store=store, expires_s=60)

    async def follow() -> list[Any]:
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:
            limiter = anyio.CapacityLimiter(1)
            stream = job_events(
                job.id, read_job=read_job, redis_client=client, limiter=limiter, max_seconds=0.5
            )
            return [event async for event in stream]
        finally:
            await client.aclose()

    started = time.monotonic()
    events = anyio.run(follow)

    assert time.monotonic() - started < 5
    assert [e.event for e in events] == ["progress", "end"]
    assert json.loads(events[-1].data) == {
        "id": job.id,
        "state": "queued",
        "reason": "the stream's time limit; reconnect",
    }


@pytest.mark.slow
def test_a_stream_cut_by_server_shutdown_ends_with_an_end_event(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    client_id, token = make_client(session, settings, Role.GENERATOR)
    job = GenerationJob(
        id=str(uuid.uuid4()),
        client_id=client_id,
        state=JobState.QUEUED,
        params={"steps": 4, "guidance": 5.0, "seed": 1, "size": 32, "num_images": 1},
        total_steps=4,
    )
    session.add(job)
    session.commit()
    factory = "services.inference.api.main:create_app"
    with served_process(factory, settings, tmp_path / "inference.log") as (url, server):
        with httpx.stream(
            "GET", f"{url}/v1/generations/{job.id}/events", headers=bearer(token), timeout=30
        ) as stream:
            lines = stream.iter_lines()
            first = _sync_event(lines)
            os.killpg(server.pid, signal.SIGTERM)  # as `tessera down` or Kubernetes would
            stopping = time.monotonic()
            rest = []
            while (event := _sync_event(lines)) is not None:
                rest.append(event)
            ended_s = time.monotonic() - stopping
        server.wait(30)
        exited_s = time.monotonic() - stopping

    print(f"server shutdown: stream's end event {ended_s:.1f} s, process gone {exited_s:.1f} s")
    assert first == ("progress", {"id": job.id, "state": "queued", "step": 0, "total_steps": 4})
    assert rest == [("end", {"id": job.id, "state": "queued", "reason": SHUTTING_DOWN})]
    assert ended_s < SHUTDOWN_GRACE_S + 2
    assert server.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled


def _sync_event(lines: Iterator[str]) -> tuple[str, dict[str, Any]] | None:
    """The next (event, data) of a stream read line by line; None when the stream ends."""
    event, data = "message", ""
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data += line.split(":", 1)[1].strip()
        elif line == "" and data:
            return event, json.loads(data)
    return None
