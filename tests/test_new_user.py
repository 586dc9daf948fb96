"""What a new user with their own Stable Diffusion checkpoint does, through the CLI (slow).

`TESSERA_BASE_MODEL=FOLDER tessera up`, enrol a device, encode its task, sync, train on a folder
of ordinary PNG and JPEG images of any size with captions, ask the inference API for a blended
generation and an `auto` one, and finish a split one on the device. The folder is a random
SDXL-like checkpoint built offline (two text encoders, pooled embeddings and `add_time_ids`, a
VAE): the most demanding of the family; SD-1.x and SD-2.x run the same services in
tests/services/inference/test_architectures.py and every model path in
tests/model/test_architectures.py.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tessera.model.encoder import encode_tasks
from tests.helpers import bearer, run_cli, stack_env

pytestmark = pytest.mark.slow


def _images(folder: Path) -> Path:
    """Three photos of different sizes and formats, captioned in captions.jsonl."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for name, size in (("a.png", (40, 30)), ("b.jpg", (64, 64)), ("c.png", (20, 50))):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": f"a watercolour of {name[0]}"}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _tokens_only(conditioning: Path) -> str:
    """The conditioning file without its pooled embeddings, base64 (what an SDXL model refuses)."""
    from safetensors.torch import load, save

    tensors = load(conditioning.read_bytes())
    return base64.b64encode(save({"prompt_embeds": tensors["prompt_embeds"]})).decode()


def _wait(url: str, headers: dict[str, str], done: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict = httpx.get(url, headers=headers).json()
        if body["state"] in done:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{url} never reached {done}")


def test_a_checkpoint_goes_through_every_command(tmp_path: Path, model_folder) -> None:
    env = stack_env(tmp_path / "stack")
    env["TESSERA_BASE_MODEL"] = str(model_folder("sdxl"))
    device = ["--dir", str(tmp_path / "device")]
    up = run_cli("up", "--detach", env=env)
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        state = json.loads((tmp_path / "stack" / "stack.json").read_text())
        operator = bearer(state["operator_token"])
        aggregator, inference = state["urls"]["aggregator"], state["urls"]["inference"]

        enrolled = run_cli("device", "enrol", "edge-1", *device, env=env)
        encoded = run_cli("device", "encode", "watercolour landscapes", *device, env=env)
        opened = httpx.post(
            f"{aggregator}/v1/rounds", json={"min_updates": 1}, headers=operator
        ).json()
        synced = run_cli("device", "sync", *device, env=env)
        data = _images(tmp_path / "photos")
        trained = run_cli(
            "device", "train", "--data", str(data), "--steps", "2", "--batch-size", "2",
            *device, env=env,
        )  # fmt: skip
        assert "uploaded to round" in trained.stdout, trained.stdout + trained.stderr
        published = _wait(
            f"{aggregator}/v1/rounds/{opened['id']}", operator, {"published", "failed"}
        )
        assert published["state"] == "published", published
        conditioning = tmp_path / "prompt.safetensors"
        prompt = run_cli(
            "device", "encode", "a red circle", "--no-upload", "--out", str(conditioning),
            *device, env=env,
        )  # fmt: skip
        painter = json.loads(
            run_cli("client", "enrol", "painter", "--role", "generator", env=env).stdout
        )
        mix = [{"adapter": "global", "weight": 0.5}, {"adapter": "cluster:0", "weight": 0.5}]
        body = {
            "prompt_embeds": base64.b64encode(conditioning.read_bytes()).decode(),
            "adapters": mix,
            "steps": 3,
        }
        headers = bearer(painter["token"])
        job = httpx.post(f"{inference}/v1/generations", json=body, headers=headers)
        assert job.status_code == 202, job.text
        finished = _wait(
            f"{inference}/v1/generations/{job.json()['id']}", headers, {"succeeded", "failed"}
        )
        assert finished["state"] == "succeeded", finished.get("error")
        png = httpx.get(finished["result"]["images"][0]["url"]).content
        routed = httpx.post(
            f"{inference}/v1/generations",
            json={**body, "adapters": "auto", "pooled": encode_tasks(["a red circle"])[0].tolist()},
            headers=headers,
        )
        auto = _wait(
            f"{inference}/v1/generations/{routed.json()['id']}", headers, {"succeeded", "failed"}
        )
        without_pooled = httpx.post(
            f"{inference}/v1/generations",
            json={**body, "prompt_embeds": _tokens_only(conditioning)},
            headers=headers,
        )
        split = httpx.post(
            f"{inference}/v1/generations", json={**body, "stop_at_step": 2}, headers=headers
        )
        stopped = _wait(
            f"{inference}/v1/generations/{split.json()['id']}", headers, {"succeeded", "failed"}
        )
        handoff = tmp_path / "handoff.safetensors"
        handoff.write_bytes(httpx.get(stopped["result"]["latents_url"]).content)
        finish = run_cli(
            "device", "finish", str(handoff), "a red circle", "--out",
            str(tmp_path / "finished.png"), *device, env=env,
        )  # fmt: skip
        local = run_cli(
            "device", "generate", "a red circle", "--steps", "3", "--out",
            str(tmp_path / "local.png"), *device, env=env,
        )  # fmt: skip
    finally:
        down = run_cli("down", env=env)

    for step in (enrolled, encoded, synced, trained, prompt, local, finish):
        assert step.returncode == 0, step.stderr + step.stdout
    assert "uploaded to round" in trained.stdout
    assert {v["name"] for v in published["published"]} >= {"global", "cluster:0"}
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (16, 16)
    assert (tmp_path / "local.png").stat().st_size > 0
    assert "ran steps 3..3 here" in finish.stdout
    assert auto["state"] == "succeeded", auto.get("error")
    assert auto["routing"]["clusters"] and auto["routing"]["clusters"][0]["weight"] > 0
    assert without_pooled.status_code == 422 and "pooled" in without_pooled.json()["detail"]
    assert (tmp_path / "finished.png").stat().st_size > 0
    assert down.returncode == 0
