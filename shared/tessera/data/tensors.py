"""Conversions between uint8 HWC images and the float NCHW tensors in [-1, 1] models consume."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (NxHxWx3 or HxWx3) to a float32 NCHW tensor in [-1, 1]."""
    import torch

    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected images of shape NxHxWx3 or HxWx3, got {array.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    return tensor.float().div(127.5).sub(1.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """A float NCHW (or CHW) tensor in [-1, 1] back to uint8 NxHxWx3 images."""
    batch = tensor.detach().float().cpu()
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a tensor of shape Nx3xHxW or 3xHxW, got {tuple(batch.shape)}")
    scaled = ((batch.clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return np.ascontiguousarray(scaled.permute(0, 2, 3, 1).numpy().astype(np.uint8))
