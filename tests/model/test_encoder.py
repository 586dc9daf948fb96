"""The prompt encoder: shapes, normalisation, determinism, batching."""

from __future__ import annotations

import pytest
import torch

from tessera.model.encoder import EMBED_DIM, ENCODER_ID, encode_prompts

PROMPTS = ["a red circle", "a blue star", "", "stripy blue shapes on grey, please"]


def test_shapes_and_dtype() -> None:
    tokens, pooled = encode_prompts(PROMPTS, max_length=16)
    assert tokens.shape == (len(PROMPTS), 16, EMBED_DIM)
    assert pooled.shape == (len(PROMPTS), EMBED_DIM)
    assert tokens.dtype == torch.float32 and pooled.dtype == torch.float32


def test_pooled_is_unit_length() -> None:
    _, pooled = encode_prompts(PROMPTS)
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(len(PROMPTS)))


def test_deterministic_and_independent_of_batching() -> None:
    first_tokens, first_pooled = encode_prompts(PROMPTS)
    again_tokens, again_pooled = encode_prompts(PROMPTS)
    assert torch.equal(first_tokens, again_tokens) and torch.equal(first_pooled, again_pooled)
    one_by_one = [encode_prompts([p], batch_size=1) for p in PROMPTS]
    torch.testing.assert_close(
        torch.cat([t for t, _ in one_by_one]), first_tokens, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        torch.cat([p for _, p in one_by_one]), first_pooled, atol=1e-5, rtol=0
    )


def test_similar_prompts_are_closer_than_unrelated_ones() -> None:
    _, pooled = encode_prompts(["a red circle", "a crimson round disc", "quarterly tax report"])
    assert float(pooled[0] @ pooled[1]) > float(pooled[0] @ pooled[2])


def test_empty_input_and_bad_arguments() -> None:
    tokens, pooled = encode_prompts([])
    assert tokens.shape == (0, 16, EMBED_DIM) and pooled.shape == (0, EMBED_DIM)
    with pytest.raises(TypeError):
        encode_prompts("a red circle")
    with pytest.raises(ValueError, match="max_length"):
        encode_prompts(["x"], max_length=1)


def test_encoder_id_names_model_and_package_version() -> None:
    assert ENCODER_ID.startswith("sentence-transformers/all-MiniLM-L6-v2@")
