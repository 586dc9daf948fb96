"""A federation round and generations over the real services on an SDXL-like checkpoint.

A random SDXL folder (two CLIP text encoders, pooled embeddings and `add_time_ids`, a VAE, an
Euler scheduler; built offline by the pipeline's own save_pretrained) is the base model of a
fresh stack: devices encode with both encoders, train through the VAE, upload; the worker
aggregates and publishes; the inference service generates a blend of the two cluster adapters,
an `auto` mix, and a split run that a device finishes. What the random model draws means
nothing; every step must run (slow). The SD-1.x path runs through the CLI in
tests/test_new_user.py.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tessera.model.base import load_base_model
from tessera.model.encoder import encode_tasks
from tessera.model.generate import generate, latents_from_bytes
from tessera.sim import SimConfig
from tessera.sim.cli import run_on_fresh_stack
from tessera.stack import StackInfo

pytestmark = pytest.mark.slow

PROMPT = "a red circle in stripes"


def _embeds(conditioning: Any) -> str:
    """What `tessera device encode --out` writes: token and pooled embeddings of one prompt."""
    from safetensors.torch import save

    tensors = {"prompt_embeds": conditioning.embeds[0].half().contiguous()}
    if conditioning.pooled is not None:
        tensors["pooled_prompt_embeds"] = conditioning.pooled[0].half().contiguous()
    return base64.b64encode(save(tensors)).decode()


def _wait(client: httpx.Client, url: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        view: dict[str, Any] = client.get(f"{url}/v1/generations/{job_id}").json()
        if view["state"] in ("succeeded", "failed"):
            assert view["state"] == "succeeded", view.get("error")
            return view
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


def test_a_round_and_generations_on_an_sdxl_checkpoint(tmp_path: Path, model_folder) -> None:
    folder = model_folder("sdxl")
    base = load_base_model(folder, device="cpu", dtype="float32")
    conditioning = base.prompts.encode([PROMPT])
    checked: dict[str, Any] = {}

    def generations(info: StackInfo) -> None:
        url = info.urls["inference"]
        operator = {"Authorization": f"Bearer {info.operator_token}"}
        enrolled = httpx.post(
            f"{info.urls['aggregator']}/v1/clients",
            json={"name": "painter", "role": "generator"},
            headers=operator,
        ).json()
        client = httpx.Client(headers={"Authorization": f"Bearer {enrolled['token']}"}, timeout=30)
        blend = [{"adapter": "cluster:0", "weight": 0.5}, {"adapter": "cluster:1", "weight": 0.5}]
        requests = {
            "blend": {"adapters": blend},
            "auto": {"adapters": "auto", "pooled": encode_tasks([PROMPT])[0].tolist()},
            "split": {"adapters": blend, "stop_at_step": 2},
        }
        for name, fields in requests.items():
            body = {"prompt_embeds": _embeds(conditioning), "steps": 4, "seed": 5, **fields}
            response = client.post(f"{url}/v1/generations", json=body)
            assert response.status_code == 202, response.text
            checked[name] = _wait(client, url, response.json()["id"])
        image = httpx.get(checked["blend"]["result"]["images"][0]["url"]).content
        checked["blend_png"] = np.asarray(Image.open(io.BytesIO(image)))
        checked["latents"] = httpx.get(checked["split"]["result"]["latents_url"]).content
        wrong = client.post(
            f"{url}/v1/generations",
            json={"prompt_embeds": _embeds(type(conditioning)(torch.zeros(1, 77, 384)))},
        )
        checked["wrong_width"] = (wrong.status_code, wrong.json()["detail"])
        no_pooled = client.post(
            f"{url}/v1/generations",
            json={"prompt_embeds": _embeds(type(conditioning)(conditioning.embeds))},
        )
        checked["no_pooled"] = (no_pooled.status_code, no_pooled.json()["detail"])

    config = SimConfig(
        devices=4,
        styles=2,
        rounds=1,
        steps=2,
        batch_size=2,
        samples=4,
        eval_images=1,
        eval_steps=2,
        workers=1,
        model=str(folder),
    )
    report = run_on_fresh_stack(config, tmp_path / "stack", log=lambda _: None, after=generations)

    assert sorted(report.rounds[0].published) == ["cluster:0 v1", "cluster:1 v1", "global v1"]
    assert report.rounds[0].bytes_up_per_device > 1000
    assert checked["blend_png"].shape == (16, 16, 3)
    routed = checked["auto"]["routing"]["clusters"]
    assert routed and abs(sum(c["weight"] for c in routed) - 1.0) < 1e-6
    assert checked["split"]["result"]["scheduler_state"]["step"] == 2
    handoff = latents_from_bytes(checked["latents"])
    assert handoff.latents.shape == (1, 4, 8, 8) and handoff.step == 2
    finished = generate(
        base,
        conditioning,
        steps=handoff.steps,
        guidance=handoff.guidance,
        start_latents=handoff.latents,
        start_step=handoff.step,
        sampler=handoff.sampler,
    )
    assert finished.images is not None and finished.images.shape == (1, 3, 16, 16)
    status, detail = checked["wrong_width"]
    assert status == 422 and str(base.facts.cond_width) in detail
    status, detail = checked["no_pooled"]
    assert status == 422 and "pooled" in detail
