"""The inference service on SD-1.x-, SD-2.x- and SDXL-like checkpoints: requests are checked against
the model's facts (conditioning width, pooled embeddings), a worker runs the blend, and a newly
published version is hot-swapped in."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save
from sqlalchemy.orm import Session, sessionmaker

from services.inference.api.main import create_app
from services.inference.worker.cache import AdapterCache
from services.inference.worker.runner import JobRuntime, run_generation
from tessera.config import Settings
from tessera.lora import random_adapter
from tessera.model.base import load_base_model
from tessera.models import GenerationJob
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.inference.helpers import images_of, publish

MiB = 1 << 20


def _b64(**tensors: torch.Tensor) -> str:
    return base64.b64encode(save({k: v.half().contiguous() for k, v in tensors.items()})).decode()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_blend_on_a_real_architecture(
    family: str,
    model_folder,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    broker,
    generator: tuple[int, str],
) -> None:
    folder = model_folder(family)
    base = load_base_model(folder, device="cpu", dtype="float32")
    ours = settings.model_copy(update={"base_model": str(folder)})
    first, second = {"sd1": (61, 62), "sd2": (71, 72), "sdxl": (81, 82)}[family]  # unused labels
    for seed, name in ((21, f"cluster:{first}"), (22, f"cluster:{second}")):
        publish(sessions, store, name, random_adapter(base.lora_spec, 4, 4.0, seed=seed, std=0.2))
    conditioning = base.prompts.encode(["a red circle in stripes"])
    tensors = {"prompt_embeds": conditioning.embeds[0]}
    if conditioning.pooled is not None:
        tensors["pooled_prompt_embeds"] = conditioning.pooled[0]
    mix = [
        {"adapter": f"cluster:{first}", "weight": 0.6},
        {"adapter": f"cluster:{second}", "weight": 0.4},
    ]
    headers = bearer(generator[1])

    with TestClient(create_app(ours)) as api:
        accepted = api.post(
            "/v1/generations",
            json={"prompt_embeds": _b64(**tensors), "adapters": mix, "steps": 3, "seed": 1},
            headers=headers,
        )
        wrong_width = api.post(
            "/v1/generations",
            json={"prompt_embeds": _b64(prompt_embeds=torch.zeros(77, 384))},
            headers=headers,
        )
        only_tokens = api.post(
            "/v1/generations",
            json={"prompt_embeds": _b64(prompt_embeds=conditioning.embeds[0])},
            headers=headers,
        )
        extra_pooled = api.post(
            "/v1/generations",
            json={
                "prompt_embeds": _b64(prompt_embeds=conditioning.embeds[0]),
                "pooled_prompt_embeds": _b64(pooled_prompt_embeds=torch.zeros(32)),
            },
            headers=headers,
        )

        cache = AdapterCache(base=base, sessions=sessions, store=store, max_bytes=64 * MiB)
        runtime = JobRuntime(sessions=sessions, store=store, redis=broker, base=base, cache=cache)
        summary = run_generation(accepted.json()["id"], runtime=runtime)
        # Hot swap: a new version of one cluster adapter is published and announced.
        swapped = random_adapter(base.lora_spec, 4, 4.0, seed=23, std=0.2)
        cache.refresh(publish(sessions, store, f"cluster:{first}", swapped).event(round_id=0))
        again = api.post(
            "/v1/generations",
            json={"prompt_embeds": _b64(**tensors), "adapters": mix, "steps": 3, "seed": 1},
            headers=headers,
        )
        after_swap = run_generation(again.json()["id"], runtime=runtime)

    assert accepted.status_code == 202, accepted.text
    assert wrong_width.status_code == 422
    assert str(base.facts.cond_width) in wrong_width.json()["detail"]
    if family == "sdxl":
        assert only_tokens.status_code == 422 and "pooled" in only_tokens.json()["detail"]
        assert extra_pooled.status_code == 202, extra_pooled.text
    else:
        assert only_tokens.status_code == 202
        assert extra_pooled.status_code == 422 and "no pooled" in extra_pooled.json()["detail"]
    assert summary["state"] == "succeeded", summary
    images = images_of(store, sessions, accepted.json()["id"])
    assert images.shape == (1, 16, 16, 3)
    assert after_swap["state"] == "succeeded", after_swap
    with sessions() as session:
        job = session.get(GenerationJob, again.json()["id"])
        assert job is not None
        pinned = {pin["adapter"]: pin["version"] for pin in job.result["adapters"]}
        assert pinned[f"cluster:{first}"] == 2 and job.result["loaded_from_store"] == []
    assert not np.array_equal(images_of(store, sessions, again.json()["id"]), images)
