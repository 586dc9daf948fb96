"""generate: blends, split equals full, isolation of concurrent mixes, input checks."""

from __future__ import annotations

import threading

import pytest
import torch

from tessera.lora import random_adapter
from tessera.lora.mixing import merge_mix
from tessera.model.base import BaseModel
from tessera.model.conditioning import Conditioning
from tessera.model.generate import (
    generate,
    latents_from_bytes,
    latents_to_bytes,
    prepare_mix,
    prepare_sample_mixes,
    seeded_latents,
)

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def prompts(base_model: BaseModel) -> Conditioning:
    return base_model.prompts.encode(PROMPTS)


def adapters(base: BaseModel) -> tuple:
    spec = base.lora_spec
    return random_adapter(spec, 4, 4.0, seed=1, std=0.1), random_adapter(
        spec, 8, 8.0, seed=2, std=0.1
    )


def test_images_are_deterministic_in_range(base_model: BaseModel, prompts: Conditioning) -> None:
    first = generate(base_model, prompts, steps=6, seed=5)
    second = generate(base_model, prompts, steps=6, seed=5)

    assert first.images is not None and second.images is not None
    assert first.images.shape == (2, 3, 32, 32) and first.finished
    assert torch.equal(first.images, second.images)
    assert first.images.min() >= -1 and first.images.max() <= 1


@pytest.mark.parametrize("k", [1, 4, 7])
def test_split_at_k_then_resume_equals_one_full_run(
    base_model: BaseModel, prompts: Conditioning, k: int
) -> None:
    a, b = adapters(base_model)
    mix = [(a, 0.6), (b, 0.4)]
    full = generate(base_model, prompts, mix, steps=8, seed=11)

    head = generate(base_model, prompts, mix, steps=8, seed=11, stop_step=k)
    tail = generate(base_model, prompts, mix, steps=8, start_latents=head.latents, start_step=k)

    assert head.images is None and head.step == k and not head.finished
    assert tail.images is not None and full.images is not None
    torch.testing.assert_close(tail.images, full.images, atol=1e-5, rtol=0)
    state = head.scheduler_state(base_model, guidance=3.0)
    assert state["step"] == k and len(state["timesteps"]) == 8


def test_blend_merges_weighted_deltas(base_model: BaseModel) -> None:
    a, b = adapters(base_model)
    module = base_model.lora_spec.modules.__iter__().__next__()
    weight = base_model.unet.get_submodule(module).weight.detach()

    merged = merge_mix(base_model.unet, base_model.lora_spec, [(a, 0.5), (b, 0.25)])

    expected = weight + 0.5 * a.delta(module) + 0.25 * b.delta(module)
    torch.testing.assert_close(merged.weights[module], expected)


def test_adapters_change_images_and_weight_zero_is_the_base(
    base_model: BaseModel, prompts: Conditioning
) -> None:
    a, _ = adapters(base_model)
    plain = generate(base_model, prompts, steps=5, seed=2).images
    zero = generate(base_model, prompts, [(a, 0.0)], steps=5, seed=2).images
    styled = generate(base_model, prompts, [(a, 1.0)], steps=5, seed=2).images

    assert plain is not None and zero is not None and styled is not None
    assert torch.equal(plain, zero)
    assert (styled - plain).abs().max() > 1e-3


def test_concurrent_jobs_with_different_mixes_equal_each_alone(
    base_model: BaseModel, prompts: Conditioning
) -> None:
    a, b = adapters(base_model)
    mixes = [[(a, 1.0)], [(b, 1.0)], [(a, 0.5), (b, 0.5)], []]
    alone = [generate(base_model, prompts, mix, steps=6, seed=3).images for mix in mixes]
    merged = [prepare_mix(base_model, mix) for mix in mixes]
    results: dict[int, torch.Tensor | None] = {}
    barrier = threading.Barrier(len(mixes))

    def job(index: int) -> None:
        barrier.wait()
        results[index] = generate(base_model, prompts, steps=6, seed=3, merged=merged[index]).images

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(mixes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for index, expected in enumerate(alone):
        assert expected is not None
        torch.testing.assert_close(results[index], expected, atol=1e-5, rtol=0)


def test_a_batch_whose_images_carry_different_mixes_equals_each_image_alone(
    base_model: BaseModel, prompts: Conditioning
) -> None:
    a, b = adapters(base_model)
    mixes = [[(a, 1.0)], [(b, 1.0)], [(a, 0.3), (b, 0.7)], []]
    prompt = Conditioning.cat([prompts.rows(slice(i % 2, i % 2 + 1)) for i in range(len(mixes))])
    noise = torch.cat([seeded_latents(base_model, 1, seed) for seed in range(len(mixes))])
    alone = [
        generate(
            base_model,
            prompt.rows(slice(i, i + 1)),
            mix,
            steps=4,
            start_latents=noise[i : i + 1],
        ).images
        for i, mix in enumerate(mixes)
    ]

    together = generate(
        base_model,
        prompt,
        steps=4,
        start_latents=noise,
        merged=prepare_sample_mixes(base_model, mixes),
    ).images

    assert together is not None
    # Float rounding of another batch size only: far below the adapters' own effect.
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-4, rtol=0)
    assert (alone[0] - alone[3]).abs().max() > 0.05  # the mixes do change the images
    with pytest.raises(ValueError, match="built for 4 samples; the batch has 2"):
        generate(base_model, prompts, steps=2, merged=prepare_sample_mixes(base_model, mixes))


def test_token_embeds_and_the_default_negative_equal_the_explicit_conditioning(
    base_model: BaseModel, prompts: Conditioning
) -> None:
    explicit = generate(
        base_model, prompts, steps=4, seed=1, negative_embeds=base_model.prompts.empty()
    )
    plain = generate(base_model, prompts.embeds, steps=4, seed=1)

    assert explicit.images is not None and plain.images is not None
    assert torch.equal(explicit.images, plain.images)


def test_a_stopped_run_hands_off_through_bytes(
    base_model: BaseModel, prompts: Conditioning
) -> None:
    full = generate(base_model, prompts, steps=6, seed=4, sampler="euler")
    head = generate(base_model, prompts, steps=6, seed=4, stop_step=2, sampler="euler")

    handoff = latents_from_bytes(latents_to_bytes(head, guidance=2.5))
    tail = generate(
        base_model,
        prompts,
        steps=handoff.steps,
        start_latents=handoff.latents,
        start_step=handoff.step,
        sampler=handoff.sampler,
    )

    assert head.sampler == "euler" and (handoff.step, handoff.steps) == (2, 6)
    assert handoff.guidance == 2.5 and handoff.sampler == "euler"
    assert torch.equal(handoff.latents, head.latents)
    assert tail.images is not None and full.images is not None
    torch.testing.assert_close(tail.images, full.images, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="hand-off"):
        latents_from_bytes(b"not safetensors")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"steps": 0}, "steps must be"),
        ({"steps": 5, "stop_step": 6}, "start_step <= stop_step <= steps"),
        ({"steps": 5, "start_step": 2}, "needs start_latents"),
        ({"steps": 5, "start_latents": torch.zeros(2, 3, 16, 16)}, "start_latents shape"),
    ],
)
def test_bad_arguments_are_refused(
    base_model: BaseModel, prompts: Conditioning, kwargs: dict, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        generate(base_model, prompts, **kwargs)


def test_bad_prompts_and_weights_are_refused(base_model: BaseModel, prompts: Conditioning) -> None:
    a, _ = adapters(base_model)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \[n, T, 384\]"):
        generate(base_model, prompts.embeds[:, :, :100], steps=2)
    with pytest.raises(ValueError, match="finite"):
        generate(base_model, prompts.embeds * float("nan"), steps=2)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        generate(base_model, prompts, [(a, -0.5)], steps=2)
    other = random_adapter(
        type(base_model.lora_spec)(
            base_model_id="x", base_model_hash="0" * 64, modules=base_model.lora_spec.modules
        ),
        4,
        4.0,
        seed=0,
    )
    with pytest.raises(ValueError, match="adapter is for base x"):
        generate(base_model, prompts, [(other, 1.0)], steps=2)
