"""Minimal classifier-free-guided DDIM sampling, used by pretraining checks and the style probe."""

from __future__ import annotations

import torch

from tessera.model.base import BaseModel


@torch.no_grad()
def sample(
    model: BaseModel,
    token_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    *,
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """Images [n, 3, H, W] in [-1, 1] for token states [n, T, 384] (uncond: [1 or n, T, 384])."""
    if model.vae is not None:
        raise NotImplementedError("latent-space sampling is not part of the tiny pixel model")
    unet = model.unet
    n = token_embeds.shape[0]
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(
        (n, config.in_channels, config.sample_size, config.sample_size), generator=generator
    ).to(model.device)
    scheduler = model.sample_scheduler
    scheduler.set_timesteps(steps)
    cond = token_embeds.to(model.device)
    uncond = uncond_embeds.to(model.device).expand(n, -1, -1)
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = unet(torch.cat([x, x]), t, context).sample.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1.0, 1.0).cpu()
