"""Every model path on each Stable Diffusion architecture: random SD-1.x, SD-2.x and SDXL folders.

The folders are built offline by the pipelines' own save_pretrained (see
`tessera.model.synthetic`); what they generate means nothing, but every step must run and keep
its invariants: shapes, the base left unchanged, files that validate, exact aggregation,
split generation equal to one run.
"""

from __future__ import annotations

import pytest
import torch

from tessera.lora import adapter_to_bytes, validate_adapter_bytes
from tessera.lora.aggregate import WeightedUpdate, aggregate_exact, aggregate_fedavg
from tessera.lora.files import LoraFileError
from tessera.lora.train import denoising_loss, train_lora
from tessera.model.base import load_base_model
from tessera.model.facts import load_facts
from tessera.model.generate import generate, latents_from_bytes, latents_to_bytes

FAMILIES = ["sd1", "sd2", "sdxl"]
CAPTIONS = ["a red circle on white", "a blue square in stripes", "a green star at night"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest, model_folder):
    folder = model_folder(request.param)
    return request.param, load_base_model(folder, device="cpu", dtype="float32", targets="full")


def test_facts_describe_the_architecture(family_model) -> None:
    family, base = family_model
    facts = base.facts

    assert facts.family == family
    assert facts.latent and facts.sample_shape == (4, 8, 8) and facts.resolution == 16
    assert facts.cond_length == 77
    assert facts.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert (facts.pooled_width is not None) == (family == "sdxl") == facts.time_ids
    assert facts.cond_width == (64 if family == "sdxl" else 32)
    shapes = facts.lora["full"].values()
    assert any(len(shape) == 4 and shape[2:] == (3, 3) for shape in shapes)  # ResNet convs
    assert set(facts.lora["attention"]) < set(facts.lora["full"])


def test_encode_train_validate_aggregate_generate(family_model) -> None:
    family, base = family_model
    conditioning = base.prompts.encode(CAPTIONS)
    assert conditioning.embeds.shape == (3, 77, base.facts.cond_width)
    if family == "sdxl":
        assert conditioning.pooled is not None and conditioning.pooled.shape == (3, 32)
    images = torch.rand(3, 3, 24, 40) * 2 - 1  # any size: resized and centre-cropped
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}

    first = train_lora(base, images, conditioning, rank=4, steps=2, batch_size=2, seed=0)
    second = train_lora(base, images, conditioning, rank=4, steps=2, batch_size=2, seed=1)

    after = base.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert first.adapter.targets == "full" and all(torch.isfinite(torch.tensor(first.losses)))
    spec = base.lora_spec
    loaded = validate_adapter_bytes(adapter_to_bytes(first.adapter), spec)
    assert set(loaded.modules) == set(spec.modules)
    with pytest.raises(LoraFileError):
        validate_adapter_bytes(adapter_to_bytes(first.adapter), base.facts.lora_spec("attention"))

    updates = [WeightedUpdate(first.adapter, 1.0), WeightedUpdate(second.adapter, 3.0)]
    exact = aggregate_exact(updates, rank=8).adapter
    fedavg = aggregate_fedavg(updates)
    module = next(m for m in spec.modules if len(spec.modules[m]) == 4)
    want = (first.adapter.delta(module) + 3 * second.adapter.delta(module)) / 4
    assert torch.allclose(exact.delta(module), want, atol=1e-5)
    assert fedavg.pair(module)[0].shape == first.adapter.pair(module)[0].shape

    mix = [(first.adapter, 0.5), (second.adapter, 0.5)]
    full = generate(base, conditioning.rows(slice(0, 2)), mix, steps=4, seed=3, sampler="euler")
    assert full.images is not None and full.images.shape == (2, 3, 16, 16)
    head = generate(
        base, conditioning.rows(slice(0, 2)), mix, steps=4, seed=3, stop_step=2, sampler="euler"
    )
    handoff = latents_from_bytes(latents_to_bytes(head, guidance=3.0))
    tail = generate(
        base,
        conditioning.rows(slice(0, 2)),
        mix,
        steps=4,
        start_step=handoff.step,
        start_latents=handoff.latents,
        sampler=handoff.sampler,
    )
    assert tail.images is not None
    assert torch.allclose(tail.images, full.images, atol=1e-4)
    assert denoising_loss(base, images, conditioning, first.adapter, repeats=1) > 0


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpm", "model"])
def test_every_sampler_runs_and_split_needs_a_stateless_one(model_folder, sampler: str) -> None:
    base = load_base_model(model_folder("sd1"), device="cpu", dtype="float32")
    prompt = base.prompts.encode(["a red circle"])

    result = generate(base, prompt, steps=3, sampler=sampler)

    assert result.images is not None and bool(torch.isfinite(result.images).all())
    if sampler in ("dpm", "model"):
        with pytest.raises(ValueError, match="split generation"):
            generate(base, prompt, steps=3, stop_step=1, sampler=sampler)


def test_wrong_conditioning_is_refused_with_the_expected_shape(model_folder) -> None:
    base = load_base_model(model_folder("sdxl"), device="cpu", dtype="float32")
    embeds = base.prompts.encode(["a red circle"]).embeds

    with pytest.raises(ValueError, match="pooled embeddings"):
        generate(base, embeds, steps=2)
    with pytest.raises(ValueError, match=r"\[n, T, 64\]"):
        generate(base, torch.zeros(1, 77, 32), steps=2)


def test_half_precision_loads_share_the_fingerprint(model_folder) -> None:
    folder = model_folder("sd2")
    facts = load_facts(folder)

    half = load_base_model(folder, device="cpu", dtype="bfloat16")

    assert half.dtype == torch.bfloat16
    assert half.fingerprint == facts.fingerprint
    prompt = half.prompts.encode(["a red circle"])
    result = generate(half, prompt, steps=2)
    assert result.images is not None and bool(torch.isfinite(result.images).all())
