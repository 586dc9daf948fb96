"""Degradations like those of a tiny diffusion model's samples: blur, noise, colour drift.

The evaluator trains on them so that its scores measure style and content, not sharpness; the
tests use them to check that robustness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Blur each NCHW image with its own gaussian sigma (pixels); sigma <= 0 leaves it as is."""
    n, c, h, w = images.shape
    sigmas = torch.as_tensor(sigma, dtype=images.dtype).expand(n).clamp(min=1e-3)
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2.0 * sigmas[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)
    flat = images.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def add_noise(
    images: torch.Tensor, std: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add per-pixel gaussian noise of standard deviation `std` (per image or scalar)."""
    scale = torch.as_tensor(std, dtype=images.dtype).reshape(-1, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images + scale * noise


def add_blotches(
    images: torch.Tensor,
    std: torch.Tensor | float,
    generator: torch.Generator | None = None,
    *,
    cells: int = 8,
) -> torch.Tensor:
    """Add smooth colour blotches (`cells` x `cells` noise upsampled), as diffusion leaves:
    8 cells give broad stains, 16 the few-pixel grain of an under-denoised sample."""
    n, c, h, w = images.shape
    coarse = torch.randn((n, c, cells, cells), generator=generator, dtype=images.dtype)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return images + torch.as_tensor(std, dtype=images.dtype).reshape(-1, 1, 1, 1) * smooth


def jitter_colour(
    images: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random brightness, contrast and per-channel shift, scaled by `strength` (0 = none)."""
    n = images.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=generator, dtype=images.dtype) * 2.0 - 1.0) * strength

    contrast = 1.0 + 1.5 * uniform(n, 1, 1, 1)
    brightness = uniform(n, 1, 1, 1)
    channel_shift = 0.6 * uniform(n, 3, 1, 1)
    return images * contrast + brightness + channel_shift


def dim(
    images: torch.Tensor, amount: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pull each image towards a random dark-to-mid grey by `amount` (0 = none): the murky
    exposure of an undertrained sampler, which must not read as a texture or a palette."""
    n = images.shape[0]
    grey = torch.rand((n, 1, 1, 1), generator=generator, dtype=images.dtype) * 0.6 - 0.5
    share = torch.as_tensor(amount, dtype=images.dtype).reshape(-1, 1, 1, 1)
    return images * (1.0 - share) + grey * share


def degrade(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    max_blur: float = 1.2,
    max_noise: float = 0.25,
    colour_strength: float = 0.08,
    max_dim: float = 0.4,
) -> torch.Tensor:
    """Random mix of blur, noise, blotches, grain, dimming and colour drift, each image its
    own amounts."""
    n = images.shape[0]

    def draw(maximum: float, probability: float) -> torch.Tensor:
        amount = torch.rand(n, generator=generator) * maximum
        keep = torch.rand(n, generator=generator) < probability
        return torch.where(keep, amount, torch.zeros_like(amount))

    out = gaussian_blur(images, draw(max_blur, 0.6))
    out = add_blotches(out, draw(max_noise / 2.0, 0.4), generator)
    out = add_blotches(out, draw(max_noise, 0.4), generator, cells=16)
    out = add_noise(out, draw(max_noise, 0.6), generator)
    out = dim(out, draw(max_dim, 0.5), generator)
    out = jitter_colour(out, colour_strength, generator)
    return out.clamp(-1.0, 1.0)
