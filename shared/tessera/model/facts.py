"""Model facts: what the services need to know about a base model, computed without its weights.

LoRA target modules and shapes per preset (from a UNet built on the meta device), the
conditioning width and token length, pooled width and `add_time_ids` for SDXL, the UNet's input
shape and the image resolution, the prediction type, the text encoders' ids, and a fingerprint
of the UNet's weights that does not depend on the dtype they are stored or loaded in (each
tensor's values are hashed as float16). Computed once, by `tessera model inspect FOLDER` or on
first use, and kept in the folder's `tessera.json`; recomputed when the UNet's files change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.model.layout import PIXEL_PIPELINE, ModelLayout, read_layout

if TYPE_CHECKING:
    from tessera.lora.adapter import LoraSpec

log = logging.getLogger(__name__)

TESSERA_FILE = "tessera.json"
FACTS_VERSION = 1
PRESETS = ("attention", "attention+ff", "full")
_HASH_CHUNK = 1 << 24  # values hashed per update, so a 3.4 GB UNet never sits twice in memory


@dataclass(frozen=True)
class ModelFacts:
    """Everything about a base model that validation and routing need, as plain data."""

    model_id: str
    pipeline: str
    family: str  # pixel | sd1 | sd2 | sdxl
    fingerprint: str
    resolution: int
    sample_shape: tuple[int, int, int]  # one UNet input: (channels, height, width)
    latent: bool
    scaling_factor: float
    prediction_type: str
    scheduler: str
    cond_width: int
    cond_length: int
    pooled_width: int | None
    time_ids: bool
    zeros_for_empty_prompt: bool
    text_encoders: tuple[str, ...]
    lora: dict[str, dict[str, tuple[int, ...]]]
    unet_files: dict[str, str] = field(default_factory=dict)

    def lora_spec(self, targets: str = "attention", max_rank: int = 64) -> LoraSpec:
        """The LoRA keys and shapes this base accepts under a target preset."""
        from tessera.lora.adapter import LoraSpec

        if targets not in self.lora:
            raise ValueError(
                f"unknown LoRA target preset {targets!r}; known: {', '.join(self.lora)}"
            )
        return LoraSpec(
            base_model_id=self.model_id,
            base_model_hash=self.fingerprint,
            modules=self.lora[targets],
            max_rank=max_rank,
            targets=targets,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what `tessera.json` keeps under "facts")."""
        return {"version": FACTS_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelFacts:
        """Read back `to_json` output."""
        values = {k: v for k, v in data.items() if k != "version"}
        values["sample_shape"] = tuple(values["sample_shape"])
        values["text_encoders"] = tuple(values["text_encoders"])
        values["lora"] = {
            preset: {name: tuple(shape) for name, shape in modules.items()}
            for preset, modules in values["lora"].items()
        }
        return cls(**values)


_cache: dict[str, ModelFacts] = {}
_lock = threading.Lock()


def load_facts(folder: Path | str) -> ModelFacts:
    """The facts of a model folder: from its `tessera.json` when current, else inspected now.

    Kept per process; written back to the folder when it is writable.
    """
    root = Path(folder).resolve()
    with _lock:
        cached = _cache.get(str(root))
        if cached is not None:
            return cached
        layout = read_layout(root)
        stored = _read_meta(root).get("facts")
        facts = None
        if isinstance(stored, dict) and stored.get("version") == FACTS_VERSION:
            candidate = ModelFacts.from_json(stored)
            if candidate.unet_files == _unet_files(layout):
                facts = candidate
        if facts is None:
            facts = inspect_model(root)
            try:
                write_facts(root, facts)
            except OSError as error:
                log.warning(
                    "model facts not saved", extra={"folder": str(root), "error": str(error)}
                )
        _cache[str(root)] = facts
        return facts


def write_facts(folder: Path, facts: ModelFacts) -> Path:
    """Keep `facts` in the folder's tessera.json, beside whatever else it holds."""
    path = folder / TESSERA_FILE
    meta = _read_meta(folder)
    meta["facts"] = facts.to_json()
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def inspect_model(folder: Path | str) -> ModelFacts:
    """Compute the facts of a model folder: configs, a meta-device UNet, the weights' hash."""
    layout = read_layout(folder)
    meta = _read_meta(layout.folder)
    unet_config = layout.config("unet")
    scheduler_config = layout.config("scheduler", "scheduler_config.json")
    sample_size = int(unet_config.get("sample_size") or 64)
    if layout.has_vae:
        vae_config = layout.config("vae")
        factor = 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)
        scaling = float(vae_config.get("scaling_factor", 0.18215))
    else:
        factor, scaling = 1, 1.0
    widths, lengths = [], []
    for encoder, tokenizer in layout.text_encoders:
        config = layout.config(encoder)
        widths.append(int(config.get("hidden_size") or config.get("d_model") or 0))
        lengths.append(_token_length(layout, tokenizer, config))
    pooled = None
    if layout.is_sdxl:
        pooled = int(layout.config("text_encoder_2").get("projection_dim") or widths[-1])
    cross = int(unet_config.get("cross_attention_dim") or 0)
    width = sum(widths) if layout.is_sdxl else widths[0]
    if cross != width:
        raise ValueError(
            f"{layout.folder}: the UNet's cross_attention_dim is {cross} but its text "
            f"encoder(s) give {width}-wide states"
        )
    model_id = str(meta.get("model_id") or layout.folder.name)
    prediction = str(scheduler_config.get("prediction_type", "epsilon"))
    facts = ModelFacts(
        model_id=model_id,
        pipeline=layout.pipeline,
        family=_family(layout, prediction, cross),
        fingerprint=unet_fingerprint(layout),
        resolution=sample_size * factor,
        sample_shape=(int(unet_config.get("in_channels", 4)), sample_size, sample_size),
        latent=layout.has_vae,
        scaling_factor=scaling,
        prediction_type=prediction,
        scheduler=str(scheduler_config.get("_class_name", "")),
        cond_width=width,
        cond_length=int(meta.get("conditioning_length") or min(lengths)),
        pooled_width=pooled,
        time_ids=unet_config.get("addition_embed_type") == "text_time",
        zeros_for_empty_prompt=bool(layout.options.get("force_zeros_for_empty_prompt", False)),
        text_encoders=tuple(
            f"{model_id}/{encoder}:{layout.components[encoder][1]}"
            for encoder, _ in layout.text_encoders
        ),
        lora=_lora_modules(layout, unet_config),
        unet_files=_unet_files(layout),
    )
    return facts


def unet_fingerprint(layout: ModelLayout) -> str:
    """sha256 over the UNet's tensors (name, shape, values as float16), in name order."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    opened: dict[Path, Any] = {}  # each file opened (safetensors) or mapped (.bin) once
    tensors: dict[str, Path] = {}
    for path in _weight_files(layout):
        if path.suffix == ".safetensors":
            opened[path] = safe_open(str(path), framework="pt")
            names = list(opened[path].keys())
        else:
            opened[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            names = list(opened[path])
        tensors.update((name, path) for name in names)
    for name in sorted(tensors):
        path = tensors[name]
        handle = opened[path]
        tensor = handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _HASH_CHUNK):
            chunk = flat[start : start + _HASH_CHUNK].to(torch.float16).contiguous()
            digest.update(chunk.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weight_files(layout: ModelLayout) -> list[Path]:
    folder = layout.path("unet")
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(p for p in folder.glob(pattern) if not _is_variant(p))
        if found:
            return found
    raise ValueError(f"{layout.folder}: unet/ holds no weight file (.safetensors or .bin)")


def _is_variant(path: Path) -> bool:
    """`diffusion_pytorch_model.fp16.safetensors`: a variant diffusers loads only when asked."""
    return len(path.name.split(".")) > 2


def _unet_files(layout: ModelLayout) -> dict[str, str]:
    """Each weight file's size and a hash of its first and last MiB: notices a new UNet cheaply."""
    signatures = {}
    for path in _weight_files(layout):
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(1 << 20)
            handle.seek(max(0, size - (1 << 20)))
            tail = handle.read()
        signatures[path.name] = f"{size}:{hashlib.sha256(head + tail).hexdigest()[:16]}"
    return signatures


def _token_length(layout: ModelLayout, tokenizer: str, encoder_config: dict[str, Any]) -> int:
    try:
        config = layout.config(tokenizer, "tokenizer_config.json")
    except ValueError:
        config = {}
    length = int(config.get("model_max_length") or 77)
    positions = int(encoder_config.get("max_position_embeddings") or length)
    return min(length, positions)


def _family(layout: ModelLayout, prediction: str, cross: int) -> str:
    if layout.pipeline == PIXEL_PIPELINE:
        return "pixel"
    if layout.is_sdxl:
        return "sdxl"
    return "sd2" if prediction == "v_prediction" or cross == 1024 else "sd1"


def _lora_modules(
    layout: ModelLayout, unet_config: dict[str, Any]
) -> dict[str, dict[str, tuple[int, ...]]]:
    """Target modules and weight shapes for each preset, from a UNet on the meta device."""
    import torch

    from tessera.lora.adapter import lora_spec

    cls = layout.component_class("unet")
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = cls.from_config(config)
    presets: dict[str, dict[str, tuple[int, ...]]] = {}
    for preset in PRESETS:
        spec = lora_spec(unet, base_model_id="", base_model_hash="", targets=preset)
        presets[preset] = {name: tuple(shape) for name, shape in spec.modules.items()}
    return presets


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / TESSERA_FILE
    if not path.exists():
        return {}
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return meta


def resolve_targets(setting: str, folder: Path | str) -> str:
    """A LoRA target preset from TESSERA_LORA_TARGETS: `auto` takes the one the model folder
    recommends in its tessera.json (`"lora": {"targets": ...}`), else `attention`."""
    if setting != "auto":
        return setting
    recommended = _read_meta(Path(folder)).get("lora", {})
    targets = recommended.get("targets") if isinstance(recommended, dict) else None
    return targets if targets in PRESETS else "attention"
