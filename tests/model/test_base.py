"""The bundled tiny base model: loads with from_pretrained, is small, and denoises on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.model.base import BUNDLED_MODEL, TESSERA_FILE, load_base_model
from tessera.model.encoder import EMBED_DIM, ENCODER_ID

MAX_BYTES = 20 * 1024 * 1024


def test_bundled_model_is_small_and_names_its_encoder() -> None:
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.rglob("*") if f.is_file())
    assert size < MAX_BYTES
    meta = json.loads((BUNDLED_MODEL / TESSERA_FILE).read_text())
    assert meta["text_encoder"] == ENCODER_ID


def test_loads_and_runs_one_denoising_step_at_batch_two() -> None:
    model = load_base_model(BUNDLED_MODEL)
    assert model.unet.config.cross_attention_dim == EMBED_DIM
    assert model.text_encoder_id == ENCODER_ID
    size = model.unet.config.sample_size
    x = torch.randn(2, model.unet.config.in_channels, size, size)
    context = torch.randn(2, 16, EMBED_DIM)
    scheduler = model.sample_scheduler
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        eps = model.unet(x, t, context).sample
        out = scheduler.step(eps, t, x).prev_sample
    assert eps.shape == x.shape and out.shape == x.shape
    assert torch.isfinite(out).all()


def test_attention_projections_exist_for_lora() -> None:
    model = load_base_model(BUNDLED_MODEL)
    names = [n for n, _ in model.unet.named_modules() if n.endswith(("to_q", "to_out.0"))]
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)


def test_missing_folder_is_reported(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError, match="unet"):
        load_base_model(tmp_path)  # type: ignore[arg-type]
