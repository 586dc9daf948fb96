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


def queue_reclustering(http: httpx.Client, options: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/clusterings: the job queued (202), or ClusteringJobError with the refusal."""
    return _json(http.post("/v1/clusterings", json=options))


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
    ClusteringJobError with the job's reason if it failed."""
    job = follow_job(http, queue_reclustering(http, options)["id"], timeout_s=timeout_s)
    if job["state"] == "failed":
        raise ClusteringJobError(f"re-clustering job {job['id']} failed: {job['error']}")
    return _json(http.get("/v1/clusterings/current"))
