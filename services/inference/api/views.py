"""A generation job as the API shows it: stored keys become short-lived presigned URLs."""

from __future__ import annotations

from datetime import timedelta

from services.inference.api.schemas import (
    GeneratedImage,
    GenerationOut,
    GenerationResult,
    Progress,
    ResolvedAdapterOut,
)
from tessera.models import GenerationJob, JobState, utcnow
from tessera.storage import ObjectStore


def job_view(job: GenerationJob, *, store: ObjectStore, expires_s: int) -> GenerationOut:
    params = job.params
    total = job.total_steps or int(params.get("stop_at_step") or params.get("steps", 0))
    return GenerationOut(
        id=job.id,
        state=job.state,
        progress=Progress(step=job.progress_step, total_steps=total),
        steps=int(params["steps"]),
        guidance=float(params["guidance"]),
        seed=int(params["seed"]),
        size=int(params["size"]),
        num_images=int(params["num_images"]),
        stop_at_step=params.get("stop_at_step"),
        adapters=[ResolvedAdapterOut(**item) for item in params.get("adapters", [])],
        routing=params.get("routing"),
        error=job.error,
        result=_result(job, store=store, expires_s=expires_s),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _result(job: GenerationJob, *, store: ObjectStore, expires_s: int) -> GenerationResult | None:
    if job.state is not JobState.SUCCEEDED:
        return None
    stored = job.result
    latents_key = stored.get("latents_key")
    return GenerationResult(
        images=[
            GeneratedImage(index=i, url=store.presigned_get_url(key, expires_s=expires_s))
            for i, key in enumerate(stored.get("images", []))
        ],
        latents_url=None
        if latents_key is None
        else store.presigned_get_url(latents_key, expires_s=expires_s),
        scheduler_state=stored.get("scheduler_state"),
        url_expires_at=utcnow() + timedelta(seconds=expires_s),
    )
