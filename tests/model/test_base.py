"""The bundled tiny base model: its folder layout, its facts, the loader, and a denoising step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tessera.model.base import (
    BUNDLED_MODEL,
    BUNDLED_MODEL_ID,
    IMAGE_SIZE,
    TINY_TOKEN_LENGTH,
    BaseModel,
    build_base_model,
    load_base_model,
)
from tessera.model.encoder import MINILM, task_encoder_info
from tessera.model.facts import TESSERA_FILE, ModelFacts, inspect_model, load_facts
from tessera.model.generate import make_scheduler
from tessera.model.layout import INDEX_FILE, PIXEL_PIPELINE, ModelFolderError, read_layout

MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture
def bundled_copy(tmp_path: Path) -> Path:
    """A writable copy of the bundled model folder (its text encoder stays in the package)."""
    folder = tmp_path / "tiny-sd"
    shutil.copytree(BUNDLED_MODEL, folder)
    return folder


def test_bundled_folder_is_small_and_a_pixel_pipeline_with_minilm() -> None:
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.rglob("*") if f.is_file())
    layout = read_layout(BUNDLED_MODEL)

    assert size < MAX_BYTES
    assert json.loads((BUNDLED_MODEL / INDEX_FILE).read_text())["_class_name"] == PIXEL_PIPELINE
    assert layout.pipeline == PIXEL_PIPELINE and not layout.has_vae and not layout.is_sdxl
    assert layout.text_encoders == [("text_encoder", "tokenizer")]
    minilm = task_encoder_info(MINILM).path
    assert layout.path("text_encoder") == minilm and layout.path("tokenizer") == minilm


def test_bundled_facts_describe_the_tiny_model(base_model: BaseModel) -> None:
    facts = load_facts(BUNDLED_MODEL)

    assert facts.model_id == BUNDLED_MODEL_ID and facts.family == "pixel"
    assert facts.resolution == IMAGE_SIZE and facts.sample_shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert not facts.latent and facts.scaling_factor == 1.0
    assert facts.cond_width == 384 and facts.cond_length == TINY_TOKEN_LENGTH
    assert facts.pooled_width is None and not facts.time_ids
    assert facts.prediction_type == "epsilon"
    assert facts.text_encoders == (f"{BUNDLED_MODEL_ID}/text_encoder:BertModel",)
    assert {"attention", "attention+ff", "full"} <= set(facts.lora)
    assert base_model.facts == facts
    assert base_model.unet.config.cross_attention_dim == facts.cond_width
    assert base_model.lora_spec.base_model_hash == facts.fingerprint


def test_stored_facts_equal_a_fresh_inspection() -> None:
    stored = json.loads((BUNDLED_MODEL / TESSERA_FILE).read_text())["facts"]

    assert inspect_model(BUNDLED_MODEL) == ModelFacts.from_json(stored)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fingerprint_does_not_depend_on_the_loaded_dtype(dtype: str) -> None:
    before = load_facts(BUNDLED_MODEL).fingerprint

    model = load_base_model(BUNDLED_MODEL, device="cpu", dtype=dtype)

    assert model.dtype == getattr(torch, dtype)
    assert model.fingerprint == before == load_facts(BUNDLED_MODEL).fingerprint
    assert inspect_model(BUNDLED_MODEL).fingerprint == before


def test_fingerprint_does_not_depend_on_the_stored_dtype(bundled_copy: Path) -> None:
    half = load_base_model(bundled_copy, device="cpu", dtype="float16")
    shutil.rmtree(bundled_copy / "unet")
    half.unet.save_pretrained(bundled_copy / "unet")  # the same weights, stored as float16

    assert inspect_model(bundled_copy).fingerprint == load_facts(BUNDLED_MODEL).fingerprint


def test_loads_and_runs_one_denoising_step_at_batch_two(base_model: BaseModel) -> None:
    facts = base_model.facts
    x = torch.randn(2, *facts.sample_shape)
    context = torch.randn(2, facts.cond_length, facts.cond_width)
    scheduler = make_scheduler(base_model, "ddim")
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[0]

    with torch.no_grad():
        eps = base_model.unet(x, t, context).sample
        out = scheduler.step(eps, t, x).prev_sample

    assert eps.shape == x.shape and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert base_model.vae is None and base_model.noise_scheduler.config.prediction_type == "epsilon"


def test_attention_projections_exist_for_lora(base_model: BaseModel) -> None:
    names = [n for n, _ in base_model.unet.named_modules() if n.endswith(("to_q", "to_out.0"))]

    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    assert set(base_model.lora_spec.modules) <= {n for n, _ in base_model.unet.named_modules()}


def test_a_built_model_has_the_bundled_layout_and_fresh_weights(tmp_path: Path) -> None:
    built = build_base_model(tmp_path / "fresh")
    bundled = load_facts(BUNDLED_MODEL)

    assert read_layout(tmp_path / "fresh").pipeline == PIXEL_PIPELINE
    assert built.facts.lora == bundled.lora and built.facts.model_id == BUNDLED_MODEL_ID
    assert built.facts.cond_length == TINY_TOKEN_LENGTH
    assert built.fingerprint != bundled.fingerprint
    assert built.facts == inspect_model(tmp_path / "fresh")


def test_a_missing_component_folder_is_named(bundled_copy: Path) -> None:
    shutil.rmtree(bundled_copy / "scheduler")

    with pytest.raises(ModelFolderError, match="scheduler/") as error:
        load_base_model(bundled_copy, device="cpu")
    assert str(bundled_copy) in str(error.value)


def test_a_folder_without_model_index_is_named(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()

    with pytest.raises(ModelFolderError, match=INDEX_FILE) as error:
        load_base_model(tmp_path, device="cpu")
    assert str(tmp_path) in str(error.value)
