"""Generation with a weighted blend of LoRA adapters, and split (edge-server) generation.

One guidance loop for every model and scheduler: it follows the scheduler protocol
(`set_timesteps`, `init_noise_sigma`, `scale_model_input`, `step`), feeds SDXL its pooled
embeddings and `add_time_ids`, runs the UNet in the model's dtype and the scheduler in float32,
and decodes through the VAE when the model has one. It can stop after `stop_step` of `steps` and
return the latents, and resume from given latents at `start_step`: with a scheduler whose step
depends only on the step index (DDIM, Euler), k steps on the server then `steps - k` on the
device equal one full run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tessera.lora.mixing import (
    ActiveMix,
    Mix,
    install_mixing,
    per_sample_mix,
    unmerged_mix,
    use_mix,
)
from tessera.model.base import BaseModel
from tessera.model.conditioning import Conditioning
from tessera.model.latents import decode_latents

Progress = Callable[[int, int], None]
MAX_STEPS = 200
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
SPLITTABLE = frozenset({"ddim", "euler"})  # a step depends on the step index, not on history


@dataclass(frozen=True)
class GenerationResult:
    """Images (None when stopped early), the latents reached and where in the schedule."""

    images: torch.Tensor | None
    latents: torch.Tensor
    step: int
    steps: int
    sampler: str = "ddim"

    @property
    def finished(self) -> bool:
        """True when every step of the schedule has run."""
        return self.step == self.steps

    def scheduler_state(self, base: BaseModel, guidance: float) -> dict[str, Any]:
        """What a device needs to resume: the scheduler, the step reached and the guidance."""
        scheduler = make_scheduler(base, self.sampler)
        scheduler.set_timesteps(self.steps)
        return {
            "scheduler": type(scheduler).__name__,
            "sampler": self.sampler,
            "config": dict(scheduler.config),
            "steps": self.steps,
            "step": self.step,
            "timesteps": [float(t) for t in scheduler.timesteps],
            "guidance": guidance,
        }


def default_sampler() -> str:
    """The configured sampler (`TESSERA_SAMPLER`)."""
    from tessera.config import get_settings

    return get_settings().sampler


def make_scheduler(base: BaseModel, sampler: str) -> Any:
    """A fresh scheduler per call (its timesteps are state; jobs run on several threads)."""
    import diffusers

    config = base.noise_scheduler.config
    if sampler == "model":
        return base.layout.component_class("scheduler").from_config(config)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join([*SAMPLERS, 'model'])}")
    scheduler: Any = getattr(diffusers, SAMPLERS[sampler]).from_config(config)
    return scheduler


def prepare_mix(base: BaseModel, mix: Mix) -> ActiveMix | None:
    """The mix for this base, unmerged (None for no adapters); installs mixing on first use."""
    if not mix:
        return None
    install_mixing(base.unet, base.lora_spec)
    return unmerged_mix(base.unet, base.lora_spec, mix)


def prepare_sample_mixes(base: BaseModel, mixes: Sequence[Mix]) -> ActiveMix | None:
    """One mix per sample of a batch (`per_sample_mix`), unmerged; None when none has adapters."""
    if not any(mixes):
        return None
    return per_sample_mix([prepare_mix(base, mix) for mix in mixes])


def as_conditioning(value: Conditioning | torch.Tensor) -> Conditioning:
    """Token embeddings alone (models without pooled embeddings) as a Conditioning."""
    return value if isinstance(value, Conditioning) else Conditioning(value)


@torch.no_grad()
def generate(
    base: BaseModel,
    prompt_embeds: Conditioning | torch.Tensor,
    adapters: Mix = (),
    *,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    negative_embeds: Conditioning | torch.Tensor | None = None,
    start_latents: torch.Tensor | None = None,
    start_step: int = 0,
    stop_step: int | None = None,
    merged: ActiveMix | None = None,
    progress: Progress | None = None,
    sampler: str | None = None,
) -> GenerationResult:
    """Images [n, 3, H, W] in [-1, 1] for n prompts under a blend of adapters.

    `prompt_embeds` is the model's conditioning (a `Conditioning`, or token embeddings
    [n, T, width] for models without pooled embeddings). `adapters` is `[(adapter, weight),
    ...]`; pass `merged` (from `prepare_mix`) instead to reuse it across calls, or a mix per
    prompt (from `prepare_sample_mixes`) to give each image its own.
    `negative_embeds` ([1 or n] prompts) defaults to the model's empty prompt. The start noise
    comes from `seed`, unless `start_latents` are given: unit noise when `start_step` is 0 (as
    `seeded_latents` draws it), else the latents a stopped run returned.
    """
    sampler = sampler or default_sampler()
    prompt = as_conditioning(prompt_embeds)
    n = check_conditioning(base, prompt, "prompt_embeds")
    stop = steps if stop_step is None else stop_step
    _check_schedule(steps, start_step, stop, start_latents, sampler)
    if merged is None:
        merged = prepare_mix(base, adapters)
    elif adapters:
        raise ValueError("pass either adapters or merged, not both")
    if merged is not None and merged.samples not in (0, n):
        raise ValueError(f"the mix was built for {merged.samples} samples; the batch has {n}")
    negative = base.prompts.empty() if negative_embeds is None else negative_embeds
    negative = as_conditioning(negative)
    check_conditioning(base, negative, "negative_embeds")
    scheduler = make_scheduler(base, sampler)
    scheduler.set_timesteps(steps, device=base.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_step)
    x = seeded_latents(base, n, seed) if start_latents is None else start_latents.float()
    if tuple(x.shape) != latent_shape(base, n):
        raise ValueError(
            f"start_latents shape must be {latent_shape(base, n)}, found {tuple(x.shape)}"
        )
    x = x.to(base.device)
    if start_step == 0:
        x = x * scheduler.init_noise_sigma
    context = Conditioning.cat([negative.expand(n), prompt]).to(base.device, base.dtype)
    with use_mix(merged):
        for index in range(start_step, stop):
            t = scheduler.timesteps[index]
            x = scheduler.step(_guided(base, scheduler, x, t, context, guidance), t, x).prev_sample
            if progress is not None:
                progress(index + 1, steps)
    images = decode_latents(base, x).cpu() if stop == steps else None
    return GenerationResult(
        images=images, latents=x.float().cpu(), step=stop, steps=steps, sampler=sampler
    )


def _guided(
    base: BaseModel,
    scheduler: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    context: Conditioning,
    guidance: float,
) -> torch.Tensor:
    """The classifier-free-guided model output at `t` (context: negatives, then prompts)."""
    n = x.shape[0]
    if guidance == 1.0:
        return predict(base, scheduler.scale_model_input(x, t), t, context.rows(slice(n, None)))
    doubled = scheduler.scale_model_input(torch.cat([x, x]), t)
    uncond, cond = predict(base, doubled, t, context).chunk(2)
    return uncond + guidance * (cond - uncond)


def predict(
    base: BaseModel, x: torch.Tensor, t: torch.Tensor | int, context: Conditioning
) -> torch.Tensor:
    """One UNet pass in the model's dtype (SDXL's added conditions included), as float32."""
    kwargs: dict[str, Any] = {}
    if base.facts.time_ids:
        if context.pooled is None:
            raise ValueError("this model needs pooled prompt embeddings (SDXL)")
        kwargs["added_cond_kwargs"] = {
            "text_embeds": context.pooled,
            "time_ids": time_ids(base, x.shape[0]).to(x.device, context.pooled.dtype),
        }
    out = base.unet(x.to(base.dtype), t, encoder_hidden_states=context.embeds, **kwargs).sample
    return out.float()


def time_ids(base: BaseModel, n: int) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop (0, 0), target size, at the resolution."""
    size = float(base.facts.resolution)
    return torch.tensor([[size, size, 0.0, 0.0, size, size]]).expand(n, -1)


def _check_schedule(
    steps: int, start: int, stop: int, start_latents: torch.Tensor | None, sampler: str
) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, found {steps}")
    if not 0 <= start <= stop <= steps:
        raise ValueError(
            f"need 0 <= start_step <= stop_step <= steps, found {start}, {stop}, {steps}"
        )
    if start > 0 and start_latents is None:
        raise ValueError("start_step > 0 needs start_latents (the latents after that step)")
    if (start > 0 or stop < steps) and sampler not in SPLITTABLE:
        raise ValueError(
            f"split generation needs a sampler in {sorted(SPLITTABLE)}, found {sampler!r}"
        )


def latent_shape(base: BaseModel, n: int) -> tuple[int, int, int, int]:
    """Shape of the UNet's input (latents, or pixels for a pixel model) for `n` images."""
    return (n, *base.facts.sample_shape)


def check_conditioning(base: BaseModel, conditioning: Conditioning, name: str) -> int:
    """The number of prompts, after checking widths (and pooled embeddings) against the model."""
    facts = base.facts
    embeds = conditioning.embeds
    if embeds.ndim != 3 or embeds.shape[2] != facts.cond_width or embeds.shape[0] < 1:
        raise ValueError(
            f"{name} must be [n, T, {facts.cond_width}] with n >= 1, found {list(embeds.shape)}"
        )
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} must be finite")
    pooled = conditioning.pooled
    if facts.pooled_width is not None:
        if pooled is None or list(pooled.shape) != [embeds.shape[0], facts.pooled_width]:
            found = None if pooled is None else list(pooled.shape)
            raise ValueError(
                f"{name}: this model needs pooled embeddings [{embeds.shape[0]}, "
                f"{facts.pooled_width}], found {found}"
            )
        if not bool(torch.isfinite(pooled).all()):
            raise ValueError(f"{name}: pooled embeddings must be finite")
    return int(embeds.shape[0])


def seeded_latents(base: BaseModel, n: int, seed: int) -> torch.Tensor:
    """The unit start noise of `n` images for `seed` (what `generate` draws when given none)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(latent_shape(base, n), generator=generator)


def latents_to_bytes(result: GenerationResult, *, guidance: float) -> bytes:
    """A stopped generation as safetensors: the latents plus where to resume (the hand-off)."""
    from safetensors.torch import save

    metadata = {
        "step": str(result.step),
        "steps": str(result.steps),
        "guidance": repr(guidance),
        "sampler": result.sampler,
    }
    return bytes(save({"latents": result.latents.contiguous()}, metadata=metadata))


@dataclass(frozen=True)
class Handoff:
    """A stopped generation as a device receives it: latents and where to resume."""

    latents: torch.Tensor
    step: int
    steps: int
    guidance: float
    sampler: str


def latents_from_bytes(data: bytes) -> Handoff:
    """Read `latents_to_bytes` output back; ValueError if malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from tessera.lora.files import LoraFileError, read_header

    try:
        _, metadata = read_header(data)
        tensors = load(data)
        step, steps = int(metadata["step"]), int(metadata["steps"])
        guidance = float(metadata["guidance"])
    except (LoraFileError, SafetensorError, KeyError, ValueError) as error:
        raise ValueError(f"not a latents hand-off file: {error}") from None
    if "latents" not in tensors:
        raise ValueError("not a latents hand-off file: no 'latents' tensor")
    sampler = metadata.get("sampler", "ddim")
    return Handoff(tensors["latents"].float(), step, steps, guidance, sampler)
