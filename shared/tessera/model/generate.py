"""Generation with a weighted blend of LoRA adapters, and split (edge-server) generation.

`generate` runs classifier-free-guided DDIM (eta 0, so deterministic given the start). It can
stop after `stop_step` of `steps` and return the latents, and resume from given latents at
`start_step`: k steps on the server then `steps - k` on the device equal one full run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tessera.lora.mixing import MergedMix, Mix, install_mixing, merge_mix, use_mix
from tessera.model.base import BaseModel
from tessera.model.encoder import empty_prompt_embeds

Progress = Callable[[int, int], None]
MAX_STEPS = 200


@dataclass(frozen=True)
class GenerationResult:
    """Images (None when stopped early), the latents reached and where in the schedule."""

    images: torch.Tensor | None
    latents: torch.Tensor
    step: int
    steps: int

    @property
    def finished(self) -> bool:
        """True when every step of the schedule has run."""
        return self.step == self.steps

    def scheduler_state(self, base: BaseModel, guidance: float) -> dict[str, Any]:
        """What a device needs to resume: the schedule, the step reached and the guidance."""
        return {
            "scheduler": "DDIMScheduler",
            "config": dict(base.noise_scheduler.config),
            "steps": self.steps,
            "step": self.step,
            "timesteps": timesteps_for(base, self.steps).tolist(),
            "guidance": guidance,
        }


def timesteps_for(base: BaseModel, steps: int) -> torch.Tensor:
    """The DDIM timesteps of a `steps`-step schedule."""
    scheduler = _fresh_scheduler(base)
    scheduler.set_timesteps(steps)
    timesteps: torch.Tensor = scheduler.timesteps
    return timesteps


def prepare_mix(base: BaseModel, mix: Mix) -> MergedMix | None:
    """Merge a mix for this base (None for no adapters), installing mixing on first use."""
    if not mix:
        return None
    install_mixing(base.unet, base.lora_spec)
    return merge_mix(base.unet, base.lora_spec, mix)


@torch.no_grad()
def generate(
    base: BaseModel,
    prompt_embeds: torch.Tensor,
    adapters: Mix = (),
    *,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    negative_embeds: torch.Tensor | None = None,
    start_latents: torch.Tensor | None = None,
    start_step: int = 0,
    stop_step: int | None = None,
    merged: MergedMix | None = None,
    progress: Progress | None = None,
) -> GenerationResult:
    """Images [n, 3, H, W] in [-1, 1] for token states [n, T, 384] under a blend of adapters.

    `adapters` is `[(adapter, weight), ...]`; pass `merged` (from `prepare_mix`) instead to
    reuse a merge across calls. `negative_embeds` ([1 or n, T, 384]) defaults to the empty
    prompt. Start noise comes from `seed` unless `start_latents` are given.
    """
    n, length = _check_prompt(base, prompt_embeds)
    stop = steps if stop_step is None else stop_step
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, found {steps}")
    if not 0 <= start_step <= stop <= steps:
        raise ValueError(
            f"need 0 <= start_step <= stop_step <= steps, found {start_step}, {stop}, {steps}"
        )
    if start_step > 0 and start_latents is None:
        raise ValueError("start_step > 0 needs start_latents (the latents after that step)")
    if merged is None:
        merged = prepare_mix(base, adapters)
    elif adapters:
        raise ValueError("pass either adapters or merged, not both")
    device = base.device
    x = seeded_latents(base, n, seed) if start_latents is None else start_latents.float()
    if tuple(x.shape) != latent_shape(base, n):
        raise ValueError(
            f"start_latents shape must be {latent_shape(base, n)}, found {tuple(x.shape)}"
        )
    x = x.to(device)
    negative = empty_prompt_embeds(length) if negative_embeds is None else negative_embeds
    context = torch.cat([negative.float().expand(n, -1, -1), prompt_embeds.float()]).to(device)
    scheduler = _fresh_scheduler(base)
    scheduler.set_timesteps(steps)
    with use_mix(merged):
        for index in range(start_step, stop):
            t = scheduler.timesteps[index]
            if guidance == 1.0:
                eps = base.unet(x, t, context[n:]).sample
            else:
                eps_uncond, eps_cond = base.unet(torch.cat([x, x]), t, context).sample.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x).prev_sample
            if progress is not None:
                progress(index + 1, steps)
    latents = x.cpu()
    images = _decode(base, x).cpu() if stop == steps else None
    return GenerationResult(images=images, latents=latents, step=stop, steps=steps)


def latent_shape(base: BaseModel, n: int) -> tuple[int, int, int, int]:
    """Shape of the latents (pixels for the tiny model) for `n` images."""
    config = base.unet.config
    return (n, int(config.in_channels), int(config.sample_size), int(config.sample_size))


def _check_prompt(base: BaseModel, prompt_embeds: torch.Tensor) -> tuple[int, int]:
    width = int(base.unet.config.cross_attention_dim)
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[2] != width or prompt_embeds.shape[0] < 1:
        raise ValueError(
            f"prompt_embeds must be [n, T, {width}] with n >= 1, found {list(prompt_embeds.shape)}"
        )
    if not bool(torch.isfinite(prompt_embeds).all()):
        raise ValueError("prompt_embeds must be finite")
    return int(prompt_embeds.shape[0]), int(prompt_embeds.shape[1])


def seeded_latents(base: BaseModel, n: int, seed: int) -> torch.Tensor:
    """The start noise of `n` images for `seed` (what `generate` draws when given none)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(latent_shape(base, n), generator=generator)


def _fresh_scheduler(base: BaseModel) -> Any:
    """A scheduler per call: its timesteps are state, and jobs may run on several threads."""
    scheduler = type(base.sample_scheduler).from_config(base.sample_scheduler.config)
    return scheduler


def _decode(base: BaseModel, x: torch.Tensor) -> torch.Tensor:
    if base.vae is None:
        return x.clamp(-1.0, 1.0)
    scaled = x / float(base.vae.config.scaling_factor)
    images: torch.Tensor = base.vae.decode(scaled).sample
    return images.clamp(-1.0, 1.0)


def latents_to_bytes(result: GenerationResult, *, guidance: float) -> bytes:
    """A stopped generation as safetensors: the latents plus where to resume (the hand-off)."""
    from safetensors.torch import save

    metadata = {"step": str(result.step), "steps": str(result.steps), "guidance": repr(guidance)}
    return bytes(save({"latents": result.latents.contiguous()}, metadata=metadata))


def latents_from_bytes(data: bytes) -> tuple[torch.Tensor, int, int, float]:
    """(latents, step, steps, guidance) from `latents_to_bytes` output; ValueError if malformed."""
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
    return tensors["latents"].float(), step, steps, guidance
