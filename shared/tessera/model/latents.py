"""Between images and what the UNet sees: resizing to the model's resolution, VAE encode/decode.

For a latent model the UNet works on `vae.encode(x).mean * scaling_factor`; for the pixel-space
tiny model the "latents" are the images themselves. Images are [n, 3, H, W] in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL.Image import Image

    from tessera.model.base import BaseModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fit_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution` (antialiased) and centre-crop to a square."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [n, 3, H, W], found {list(images.shape)}")
    height, width = int(images.shape[2]), int(images.shape[3])
    if (height, width) == (resolution, resolution):
        return images.float()
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    resized = torch.nn.functional.interpolate(
        images.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return resized[:, :, top : top + resolution, left : left + resolution].clamp(-1.0, 1.0)


def pil_to_tensor(image: Image) -> torch.Tensor:
    """A PIL image as [3, H, W] in [-1, 1] (RGB)."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image file, resized and centre-cropped to [3, resolution, resolution]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            tensor = pil_to_tensor(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None
    return fit_images(tensor.unsqueeze(0), resolution)[0]


@torch.no_grad()
def encode_images(base: BaseModel, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """UNet inputs for images at the model's resolution: VAE latents (scaled) or the pixels."""
    images = fit_images(images, base.facts.resolution)
    if base.vae is None:
        return images
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(base.vae.device, base.vae.dtype)
        latents = base.vae.encode(chunk).latent_dist.mean
        out.append(latents.float().cpu() * base.facts.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Images [n, 3, H, W] in [-1, 1] from UNet-space latents."""
    if base.vae is None:
        return latents.float().clamp(-1.0, 1.0)
    vae = base.vae_decoder
    scaled = latents.to(vae.device, vae.dtype) / base.facts.scaling_factor
    images: torch.Tensor = vae.decode(scaled).sample.float()
    return images.clamp(-1.0, 1.0)
