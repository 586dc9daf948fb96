"""LoRA files: fp16 round trip with metadata, and a validator that names every failure."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save

from tessera.lora import (
    LoraAdapter,
    LoraFileError,
    LoraSpec,
    adapter_from_bytes,
    adapter_to_bytes,
    random_adapter,
    validate_adapter_bytes,
)
from tessera.lora.files import FILE_FORMAT

SPEC = LoraSpec(
    base_model_id="test/base",
    base_model_hash="ab" * 32,
    modules={"blocks.0.attn1.to_q": (16, 24), "blocks.0.attn1.to_out.0": (24, 16)},
    max_rank=16,
)
KEY_A = "blocks.0.attn1.to_q.lora_A.weight"
KEY_B = "blocks.0.attn1.to_q.lora_B.weight"


def metadata(**overrides: str) -> dict[str, str]:
    meta = {
        "format": FILE_FORMAT,
        "base_model_id": SPEC.base_model_id,
        "base_model_hash": SPEC.base_model_hash,
        "rank": "4",
        "alpha": "4.0",
        "target_modules": "to_q,to_out.0",
        "dtype": "float16",
    }
    meta.update(overrides)
    return meta


def tensors(rank: int = 4, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    adapter = random_adapter(SPEC, rank, float(rank), seed=0)
    return {k: v.to(dtype) for k, v in adapter.tensors.items()}


def blob(values: dict[str, torch.Tensor] | None = None, **meta: str) -> bytes:
    return bytes(save(tensors() if values is None else values, metadata=metadata(**meta)))


def failure(data: bytes, max_bytes: int | None = None) -> LoraFileError:
    with pytest.raises(LoraFileError) as caught:
        validate_adapter_bytes(data, SPEC, max_bytes=max_bytes)
    return caught.value


def test_round_trip_is_fp16_on_the_wire_and_keeps_metadata() -> None:
    adapter = random_adapter(SPEC, 4, 8.0, seed=1).with_extra(samples="32", adapter_id="v7")
    data = adapter_to_bytes(adapter)

    loaded = validate_adapter_bytes(data, SPEC)

    assert (loaded.rank, loaded.alpha, loaded.scale) == (4, 8.0, 2.0)
    assert loaded.extra == {"samples": "32", "adapter_id": "v7"}
    assert loaded.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    for key, value in adapter.tensors.items():
        assert loaded.tensors[key].dtype == torch.float32
        torch.testing.assert_close(loaded.tensors[key], value, atol=1e-4, rtol=1e-3)
    # fp16: two bytes per value plus a small header
    assert len(data) < adapter.parameters * 2 + 2048


def test_fp32_files_are_accepted_too() -> None:
    data = adapter_to_bytes(random_adapter(SPEC, 2, 2.0, seed=2), dtype="float32")
    assert validate_adapter_bytes(data, SPEC).rank == 2


def test_delta_is_scale_times_b_a() -> None:
    adapter = random_adapter(SPEC, 4, 2.0, seed=3)
    a, b = adapter.pair("blocks.0.attn1.to_q")
    torch.testing.assert_close(adapter.delta("blocks.0.attn1.to_q"), 0.5 * b @ a)


def test_too_large_names_the_limit() -> None:
    error = failure(blob(), max_bytes=100)
    assert error.expected == "<= 100 bytes"
    assert "too large" in str(error)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"abc", "not a safetensors file"),
        (struct.pack("<Q", 10**9) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "JSON object"),
    ],
)
def test_garbage_is_refused(data: bytes, words: str) -> None:
    assert words in str(failure(data))


@pytest.mark.parametrize(
    "meta, key, expected",
    [
        ({"format": "other/9"}, "format", FILE_FORMAT),
        ({"base_model_id": "sd15"}, "base_model_id", SPEC.base_model_id),
        ({"base_model_hash": "00" * 32}, "base_model_hash", SPEC.base_model_hash),
        ({"rank": "four"}, "rank", "an integer"),
        ({"rank": "0"}, "rank", "1..16"),
        ({"rank": "99"}, "rank", "1..16"),
        ({"alpha": "nan"}, "alpha", "> 0"),
        ({"alpha": "-1"}, "alpha", "> 0"),
    ],
)
def test_metadata_failures_name_key_expected_and_found(
    meta: dict[str, str], key: str, expected: str
) -> None:
    error = failure(blob(**meta))
    assert error.key == key
    assert error.expected == expected
    assert key in str(error) and "expected" in str(error) and "found" in str(error)


def test_unknown_key_is_named() -> None:
    values = tensors()
    values["blocks.9.attn1.to_q.lora_A.weight"] = torch.zeros(4, 24, dtype=torch.float16)
    error = failure(blob(values))
    assert error.key == "blocks.9.attn1.to_q.lora_A.weight"
    assert "unknown key" in str(error)


def test_missing_key_is_named() -> None:
    values = tensors()
    del values[KEY_B]
    error = failure(blob(values))
    assert error.key == KEY_B
    assert "missing" in str(error)


def test_wrong_shape_names_expected_and_found() -> None:
    values = tensors()
    values[KEY_A] = torch.zeros(4, 23, dtype=torch.float16)
    error = failure(blob(values))
    assert (error.key, error.expected, error.found) == (KEY_A, [4, 24], [4, 23])


def test_inconsistent_ranks_are_refused() -> None:
    values = tensors()
    values[KEY_A] = torch.zeros(8, 24, dtype=torch.float16)
    values[KEY_B] = torch.zeros(16, 8, dtype=torch.float16)
    error = failure(blob(values))
    assert error.key == KEY_A and error.expected == [4, 24] and error.found == [8, 24]


def test_dtype_must_match_metadata_and_be_a_float() -> None:
    error = failure(blob(tensors(dtype=torch.float32)))
    assert (error.expected, error.found) == ("float16", "float32")
    values = {k: v.to(torch.int32) for k, v in tensors().items()}
    assert "unsupported dtype" in str(failure(blob(values)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(bad: float) -> None:
    values = tensors()
    values[KEY_B][3, 1] = bad
    error = failure(blob(values))
    assert error.key == KEY_B and error.found == "1 NaN/inf"


def test_truncated_data_is_refused() -> None:
    data = blob()
    assert "unreadable" in str(failure(data[:-10])) or "header" in str(failure(data[:-10]))


def test_parsing_without_a_spec_reads_any_adapter() -> None:
    adapter = adapter_from_bytes(blob())
    assert isinstance(adapter, LoraAdapter) and adapter.rank == 4
    assert adapter.base_model_hash == SPEC.base_model_hash
