"""The operator's re-clustering over HTTP: queue a job, then follow it until it is over.

Shared by `tessera cluster ...` and the simulator, so that both read a job's states one way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

JOB_PATH = "/v1/clustering-jobs"
FINISHED = ("succeeded", "failed")
POLL_S = 0.5


class ClusteringJobError(RuntimeError):
    """A refused request, a failed job, or one still running past its timeout."""


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.is_error:
        raise ClusteringJobError(f"{response.status_code}: {response.text[:500]}")
    return dict(response.json())


def _active_job(http: httpx.Client) -> dict[str, Any] | None:
    """The job queued or running, if any (at most one is: POST /v1/clusterings refuses another)."""
    response = http.get(JOB_PATH, params={"limit": 5})
    jobs = response.json() if response.is_success else []
    return next((job for job in jobs if job["state"] not in FINISHED), None)


def follow_job(
    http: httpx.Client,
    job_id: int,
    *,
    timeout_s: float,
    on_change: Callable[[dict[str, Any]], None] = lambda _job: None,
) -> dict[str, Any]:
    """Poll a job until it has succeeded or failed, calling `on_change` at each new state;
    the final job. ClusteringJobError if it is not over within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    seen: tuple[str, int] | None = None
    while True:
        job = _json(http.get(f"{JOB_PATH}/{job_id}"))
        if (job["state"], job["attempts"]) != seen:
            seen = (job["state"], job["attempts"])
            on_change(job)
        if job["state"] in FINISHED:
            return job
        if time.monotonic() > deadline:
            raise ClusteringJobError(f"job {job_id} still {job['state']} after {timeout_s:g} s")
        time.sleep(POLL_S)


def recluster_and_wait(
    http: httpx.Client, options: dict[str, Any], *, timeout_s: float
) -> dict[str, Any]:
    """Queue a re-clustering and return the clustering it made (GET /v1/clusterings/current);
    ClusteringJobError with the job's reason if it failed.

    Where another job is queued or running (one the round loop queued on drift, say), it is
    followed to its end first, and ours queued after it: the clustering returned is this one's.
    """
    deadline = time.monotonic() + timeout_s
    ended_meanwhile = False
    while True:
        response = http.post("/v1/clusterings", json=options)
        if response.status_code != 409:
            break
        active = _active_job(http)
        if active is None:
            if ended_meanwhile:  # a 409 with no job active: a refusal (no vectors, say)
                break
            ended_meanwhile = True  # the job that refused us may have ended since: ask again
            continue
        ended_meanwhile = False
        follow_job(http, active["id"], timeout_s=max(deadline - time.monotonic(), POLL_S))
    job = follow_job(http, _json(response)["id"], timeout_s=max(deadline - time.monotonic(), 1))
    if job["state"] == "failed":
        raise ClusteringJobError(f"re-clustering job {job['id']} failed: {job['error']}")
    return _json(http.get("/v1/clusterings/current"))
