"""Pretraining's noise: with `offset_noise`, each image's noise carries a per-channel offset."""

from __future__ import annotations

from pathlib import Path

import torch

from tessera.model.base import build_base_model
from tessera.model.pretrain import ALL_CAPTIONS, EMPTY_CAPTION, pretrain


def _trained(folder: Path, offset_noise: float) -> dict[str, torch.Tensor]:
    """One step from the same fresh model, seed and batch; the UNet's weights after it."""
    torch.manual_seed(0)  # the fresh UNet's initial weights
    model = build_base_model(folder)
    texts = (*ALL_CAPTIONS, EMPTY_CAPTION)
    tokens = torch.randn(len(texts), 4, 384, generator=torch.Generator().manual_seed(1))
    pretrain(
        model,
        (texts, tokens),
        steps=1,
        batch_size=2,
        lr=1e-2,
        seed=0,
        device="cpu",
        offset_noise=offset_noise,
    )
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def test_offset_noise_changes_the_step_and_zero_keeps_plain_noise(tmp_path: Path) -> None:
    plain = _trained(tmp_path / "a", 0.0)
    again = _trained(tmp_path / "b", 0.0)
    offset = _trained(tmp_path / "c", 0.1)

    assert all(torch.equal(plain[k], again[k]) for k in plain)  # deterministic for a seed
    changed = [k for k in plain if not torch.equal(plain[k], offset[k])]
    assert len(changed) > len(plain) // 2
