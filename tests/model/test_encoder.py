"""The task encoder (vectors for clustering and routing) and the bundled model's prompt encoder."""

from __future__ import annotations

import pytest
import torch

from tessera.model.base import TINY_TOKEN_LENGTH, BaseModel
from tessera.model.encoder import (
    MINILM,
    MINILM_ID,
    encode_tasks,
    load_task_encoder,
    task_encoder_info,
)

PROMPTS = ["a red circle", "a blue star", "", "stripy blue shapes on grey, please"]
WIDTH = 384  # MiniLM's hidden size: the task vectors' width and the tiny UNet's context width


def test_task_vectors_are_unit_length_float32() -> None:
    vectors = encode_tasks(PROMPTS)

    assert vectors.shape == (len(PROMPTS), WIDTH) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(PROMPTS)))


def test_task_vectors_are_deterministic_and_independent_of_batching() -> None:
    first = encode_tasks(PROMPTS)
    again = encode_tasks(PROMPTS)
    one_by_one = torch.cat([encode_tasks([p], batch_size=1) for p in PROMPTS])

    assert torch.equal(first, again)
    torch.testing.assert_close(one_by_one, first, atol=1e-5, rtol=0)


def test_similar_tasks_are_closer_than_unrelated_ones() -> None:
    vectors = encode_tasks(["a red circle", "a crimson round disc", "quarterly tax report"])

    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_long_descriptions_are_truncated_not_refused() -> None:
    vectors = encode_tasks(["stripes " * 400])

    assert vectors.shape == (1, WIDTH) and bool(torch.isfinite(vectors).all())


def test_empty_input_and_a_single_string() -> None:
    assert encode_tasks([]).shape == (0, WIDTH)
    with pytest.raises(TypeError, match="sequence"):
        encode_tasks("a red circle")


def test_task_encoder_info_names_minilm_and_its_width() -> None:
    info = task_encoder_info(MINILM)

    assert info.encoder_id == MINILM_ID
    assert MINILM_ID.startswith("sentence-transformers/all-MiniLM-L6-v2@")
    assert info.width == WIDTH
    assert (info.path / "config.json").is_file()


def test_task_encoder_info_refuses_a_folder_without_a_model(tmp_path) -> None:
    with pytest.raises(ValueError, match="TESSERA_TASK_ENCODER") as error:
        task_encoder_info(str(tmp_path))
    assert "config.json" in str(error.value)


# -- the base model's own text encoder, which conditions the UNet ------------------------------


def test_prompt_states_have_the_models_length_and_width(base_model: BaseModel) -> None:
    encoded = base_model.prompts.encode(PROMPTS)

    assert encoded.embeds.shape == (len(PROMPTS), TINY_TOKEN_LENGTH, WIDTH)
    assert encoded.embeds.dtype == torch.float32 and encoded.pooled is None
    assert base_model.facts.cond_length == TINY_TOKEN_LENGTH
    assert base_model.facts.cond_width == WIDTH


def test_prompt_states_are_deterministic_and_independent_of_batching(
    base_model: BaseModel,
) -> None:
    first = base_model.prompts.encode(PROMPTS)
    again = base_model.prompts.encode(PROMPTS)
    one_by_one = torch.cat([base_model.prompts.encode([p], batch_size=1).embeds for p in PROMPTS])
    reversed_batch = base_model.prompts.encode(PROMPTS[::-1]).embeds.flip(0)

    assert torch.equal(first.embeds, again.embeds)
    torch.testing.assert_close(one_by_one, first.embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(reversed_batch, first.embeds, atol=1e-5, rtol=0)


def test_prompt_states_are_minilms_token_states_at_16_tokens(base_model: BaseModel) -> None:
    minilm = load_task_encoder(MINILM)  # the same MiniLM weights, loaded independently
    batch = minilm.tokenizer(
        PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        expected = minilm.model(**batch).last_hidden_state

    torch.testing.assert_close(base_model.prompts.encode(PROMPTS).embeds, expected)


def test_the_empty_prompt_is_the_encoded_empty_string(base_model: BaseModel) -> None:
    empty = base_model.prompts.empty()

    assert empty.embeds.shape == (1, TINY_TOKEN_LENGTH, WIDTH)
    torch.testing.assert_close(empty.embeds, base_model.prompts.encode([""]).embeds)


def test_prompt_encoder_empty_input_and_a_single_string(base_model: BaseModel) -> None:
    assert base_model.prompts.encode([]).embeds.shape == (0, TINY_TOKEN_LENGTH, WIDTH)
    with pytest.raises(TypeError, match="sequence"):
        base_model.prompts.encode("a red circle")  # type: ignore[arg-type]
