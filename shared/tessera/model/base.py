"""The base model: a diffusers UNet conditioned on MiniLM token states, plus its schedulers.

Loaded with `from_pretrained` from a diffusers folder (the bundled tiny model or any
Stable-Diffusion-1.x-style folder named by `TESSERA_BASE_MODEL`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.model.encoder import EMBED_DIM, ENCODER_ID

if TYPE_CHECKING:
    import torch

    from tessera.lora.adapter import LoraSpec

# diffusers' lazy module hides its classes' attributes from mypy; name them for the reader.
UNet2DConditionModel = Any
AutoencoderKL = Any
DDPMScheduler = Any
DDIMScheduler = Any

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"
TESSERA_FILE = "tessera.json"
BUNDLED_MODEL_ID = "tessera/tiny-sd"
IMAGE_SIZE = 32

# Attention (self + cross) at 16x16, 8x8 and in the 8x8 mid block: where a LoRA on
# to_q/to_k/to_v/to_out.0 sees the whole image, so it can carry a global style.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": EMBED_DIM,
    "attention_head_dim": 2,  # diffusers' legacy name: this is the number of heads
    "norm_num_groups": 8,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


@dataclass
class BaseModel:
    """UNet, optional VAE (None: pixel space), schedulers and the text encoder it expects."""

    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sample_scheduler: DDIMScheduler
    vae: AutoencoderKL | None
    text_encoder_id: str
    path: Path | None = None
    model_id: str = BUNDLED_MODEL_ID

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are."""
        device: torch.device = self.unet.device
        return device

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the UNet weights: adapters record it and are refused by any other base."""
        from tessera.lora.adapter import weights_fingerprint

        return weights_fingerprint(self.unet)

    @cached_property
    def lora_spec(self) -> LoraSpec:
        """Which LoRA keys and shapes this base accepts (attention projections of the UNet)."""
        from tessera.lora.adapter import lora_spec

        return lora_spec(self.unet, base_model_id=self.model_id, base_model_hash=self.fingerprint)


def build_base_model() -> BaseModel:
    """A freshly initialised tiny pixel-space model (before pretraining)."""
    import diffusers

    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    noise: DDPMScheduler = diffusers.DDPMScheduler(**SCHEDULER_CONFIG)
    return BaseModel(
        unet=unet,
        noise_scheduler=noise,
        sample_scheduler=diffusers.DDIMScheduler.from_config(noise.config),
        vae=None,
        text_encoder_id=ENCODER_ID,
    )


def save_base_model(
    model: BaseModel, path: Path | str, extra: dict[str, Any] | None = None
) -> None:
    """Write the model in diffusers' folder layout plus `tessera.json` (encoder id, notes)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out / "unet")
    model.noise_scheduler.save_pretrained(out / "scheduler")
    if model.vae is not None:
        model.vae.save_pretrained(out / "vae")
    meta = {
        "model_id": model.model_id,
        "text_encoder": model.text_encoder_id,
        "latent": model.vae is not None,
        **(extra or {}),
    }
    (out / TESSERA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def default_base_model_path() -> Path:
    """The configured base model folder (`TESSERA_BASE_MODEL`), else the bundled one."""
    try:
        from tessera.config import get_settings

        return Path(get_settings().base_model)
    except Exception:  # settings may be unavailable in a bare library use
        return BUNDLED_MODEL


def load_base_model(path: Path | str | None = None, device: str = "cpu") -> BaseModel:
    """Load UNet, scheduler and (if present) VAE from a diffusers folder with from_pretrained."""
    import diffusers

    folder = Path(path) if path is not None else default_base_model_path()
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"no diffusers model at {folder}: missing the unet/ folder")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").to(device).eval()
    noise = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    vae = None
    if (folder / "vae").is_dir():
        vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").to(device).eval()
    meta_file = folder / TESSERA_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    encoder_id = str(meta.get("text_encoder", "unknown"))
    if unet.config.cross_attention_dim != EMBED_DIM and encoder_id == ENCODER_ID:
        raise ValueError(
            f"unet cross_attention_dim {unet.config.cross_attention_dim} != {EMBED_DIM}"
        )
    return BaseModel(
        unet=unet,
        noise_scheduler=noise,
        sample_scheduler=diffusers.DDIMScheduler.from_config(noise.config),
        vae=vae,
        text_encoder_id=encoder_id,
        path=folder,
        model_id=str(meta.get("model_id", folder.name)),
    )
