"""LoRA files: fp16 round trip with metadata, and a validator that names every failure."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import replace

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
    read_header,
    validate_adapter_bytes,
    validate_adapter_stream,
)
from tessera.lora.files import FILE_FORMAT, MAX_HEADER_ENTRIES

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


def blob(values: dict[str, torch.Tensor] | None = None, /, **meta: str) -> bytes:
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
    assert error.public.startswith(key) and "found" not in error.public


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "1e400"])
def test_a_non_finite_alpha_is_refused_without_echoing_it(alpha: str) -> None:
    error = failure(blob(alpha=alpha))

    assert (error.key, error.expected) == ("alpha", "> 0")
    assert error.public == "alpha: alpha must be positive and finite (expected > 0)"


def test_unknown_key_is_found_but_never_public() -> None:
    values = tensors()
    values["blocks.9.attn1.to_q.lora_A.weight"] = torch.zeros(4, 24, dtype=torch.float16)

    error = failure(blob(values))

    assert error.key == ""
    assert "unknown key" in error.public and "blocks.9" not in error.public
    assert "blocks.9.attn1.to_q.lora_A.weight" in str(error)


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


CONV_SPEC = LoraSpec(
    base_model_id="test/base",
    base_model_hash="ab" * 32,
    modules={"blocks.0.attn1.to_q": (16, 24), "blocks.0.resnets.0.conv1": (8, 6, 3, 3)},
    max_rank=16,
    targets="full",
)
CONV_A = "blocks.0.resnets.0.conv1.lora_A.weight"
CONV_B = "blocks.0.resnets.0.conv1.lora_B.weight"


def conv_blob(**replaced: torch.Tensor) -> bytes:
    adapter = random_adapter(CONV_SPEC, 4, 4.0, seed=0)
    values = {k: v.half() for k, v in {**adapter.tensors, **replaced}.items()}
    return bytes(save(values, metadata=metadata(targets="full")))


def test_conv_adapter_round_trip_keeps_layout_and_preset() -> None:
    adapter = random_adapter(CONV_SPEC, 4, 8.0, seed=1)

    data = adapter_to_bytes(adapter)
    loaded = validate_adapter_bytes(data, CONV_SPEC)
    unchecked = adapter_from_bytes(data)

    assert loaded.targets == unchecked.targets == "full"
    assert loaded.pair("blocks.0.resnets.0.conv1")[0].shape == (4, 6, 3, 3)
    assert loaded.pair("blocks.0.resnets.0.conv1")[1].shape == (8, 4, 1, 1)
    for key, value in adapter.tensors.items():
        torch.testing.assert_close(loaded.tensors[key], value, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(
        loaded.delta("blocks.0.resnets.0.conv1"),
        adapter.delta("blocks.0.resnets.0.conv1"),
        atol=1e-4,
        rtol=1e-2,
    )


@pytest.mark.parametrize(
    ("key", "found", "expected"),
    [
        (CONV_A, (4, 6, 3, 2), [4, 6, 3, 3]),
        (CONV_A, (4, 54), [4, 6, 3, 3]),
        (CONV_B, (8, 4, 3, 3), [8, 4, 1, 1]),
        (CONV_B, (8, 4), [8, 4, 1, 1]),
    ],
    ids=["a-kernel", "a-flat", "b-kernel", "b-flat"],
)
def test_wrong_conv_shape_names_key_expected_and_found(
    key: str, found: tuple[int, ...], expected: list[int]
) -> None:
    with pytest.raises(LoraFileError) as caught:
        validate_adapter_bytes(conv_blob(**{key: torch.zeros(found)}), CONV_SPEC)

    error = caught.value
    assert (error.key, error.expected, error.found) == (key, expected, list(found))
    assert key in str(error) and str(expected) in str(error) and str(list(found)) in str(error)


def test_another_preset_is_refused_naming_both() -> None:
    attention_file = adapter_to_bytes(random_adapter(SPEC, 4, 4.0, seed=0))
    with pytest.raises(LoraFileError) as caught:
        validate_adapter_bytes(attention_file, replace(SPEC, targets="full"))

    error = caught.value
    assert (error.key, error.expected, error.found) == ("targets", "full", "attention")
    assert "'full'" in error.public and "attention" not in error.public
    assert "found attention" in str(error)


def test_a_file_without_a_preset_is_read_as_attention() -> None:
    data = blob()  # the metadata helper writes no "targets"

    assert validate_adapter_bytes(data, SPEC).targets == "attention"
    assert adapter_from_bytes(data).targets == "attention"
    assert failure_for(data, replace(SPEC, targets="attention+ff")).found == "attention"


def failure_for(data: bytes, spec: LoraSpec) -> LoraFileError:
    with pytest.raises(LoraFileError) as caught:
        validate_adapter_bytes(data, spec)
    return caught.value


def raw(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def entry_with(**fields: object) -> bytes:
    entry = {"dtype": "F16", "shape": [4, 24], "data_offsets": [0, 192], **fields}
    return raw(json.dumps({KEY_A: entry}).encode())


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (raw(b"[" * 50_000 + b"]" * 50_000), "nested too deeply"),
        (raw(b'{"a":' * 50_000 + b"1" + b"}" * 50_000), "nested too deeply"),
        (raw(b'{"__metadata__":' + b"[" * 50_000 + b"]" * 50_000 + b"}"), "nested too deeply"),
        (entry_with(shape=4), "shape must list non-negative integers"),
        (entry_with(shape=None), "shape must list non-negative integers"),
        (entry_with(shape=["4", "24"]), "shape must list non-negative integers"),
        (entry_with(shape=[4, -1]), "shape must list non-negative integers"),
        (entry_with(shape=[4, 2.5]), "shape must list non-negative integers"),
        (entry_with(shape=[True, 24]), "shape must list non-negative integers"),
        (entry_with(dtype=16), "dtype must be a string"),
        (entry_with(dtype=None), "dtype must be a string"),
        (entry_with(dtype=["F16"]), "dtype must be a string"),
        (entry_with(data_offsets=None), "data_offsets must be"),
        (entry_with(data_offsets=[0]), "data_offsets must be"),
        (entry_with(data_offsets=[192, 0]), "data_offsets must be"),
        (entry_with(data_offsets=[-1, 192]), "data_offsets must be"),
        (entry_with(data_offsets="0-192"), "data_offsets must be"),
        (raw(json.dumps({KEY_A: [1, 2]}).encode()), "malformed tensor entry"),
        (raw(json.dumps({KEY_A: {"dtype": "F16"}}).encode()), "malformed tensor entry"),
        (raw(json.dumps({KEY_A: {"dtype": "F16", "shape": [4]}}).encode()), "malformed tensor"),
    ],
    ids=[
        "deep-array",
        "deep-object",
        "deep-metadata",
        "shape-int",
        "shape-null",
        "shape-strings",
        "shape-negative",
        "shape-float",
        "shape-bool",
        "dtype-int",
        "dtype-null",
        "dtype-list",
        "offsets-null",
        "offsets-one",
        "offsets-reversed",
        "offsets-negative",
        "offsets-string",
        "entry-list",
        "entry-no-shape",
        "entry-no-offsets",
    ],
)
def test_malformed_headers_give_a_lora_file_error(data: bytes, words: str) -> None:
    with pytest.raises(LoraFileError, match=words) as caught:
        read_header(data)

    assert caught.value.key in ("", KEY_A)
    with pytest.raises(LoraFileError, match=words):
        adapter_from_bytes(data)


def with_entry(**fields: object) -> bytes:
    """A valid file whose KEY_A entry has `fields` replaced."""
    data = blob()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header[KEY_A].update(fields)
    return raw(json.dumps(header).encode()) + data[8 + length :]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"shape": 4}, "shape must list non-negative integers"),
        ({"shape": None}, "shape must list non-negative integers"),
        ({"dtype": 16}, "dtype must be a string"),
        ({"data_offsets": [10, 0]}, "data_offsets must be"),
    ],
    ids=["shape-int", "shape-null", "dtype-int", "offsets-reversed"],
)
def test_the_validator_refuses_a_malformed_entry_naming_the_key(
    fields: dict[str, object], words: str
) -> None:
    data = with_entry(**fields)

    error = failure(data)

    assert error.key == KEY_A
    assert words in error.public


def test_a_header_one_level_deeper_than_safetensors_is_refused_before_parsing() -> None:
    nested = {KEY_A: {"dtype": "F16", "shape": [[[[4]]]], "data_offsets": [0, 8]}}

    with pytest.raises(LoraFileError, match="nested too deeply") as caught:
        read_header(raw(json.dumps(nested).encode()))

    assert caught.value.public == "safetensors header is nested too deeply (expected <= 4 levels)"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    data = blob(target_modules="[[[[[[{{{{{{", rank="4")

    adapter = validate_adapter_bytes(data, SPEC)

    assert adapter.rank == 4


def test_a_header_with_too_many_entries_is_refused() -> None:
    header = {str(i): 0 for i in range(MAX_HEADER_ENTRIES + 1)}  # counted before checked

    with pytest.raises(LoraFileError, match="too many entries"):
        read_header(raw(json.dumps(header).encode()))


# -- the same checks over a stream (an object read back from the store) --------------------------


def pieces(data: bytes, size: int, read: list[int] | None = None) -> Iterator[bytes]:
    """`data` in chunks of `size` bytes, counting in `read` how many bytes were handed out."""
    for start in range(0, len(data), size):
        chunk = data[start : start + size]
        if read is not None:
            read.append(len(chunk))
        yield chunk


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_a_stream_in_any_chunks_passes_as_its_bytes_do(chunk: int) -> None:
    data = blob()
    checked = validate_adapter_stream(pieces(data, chunk), SPEC, size=len(data))
    assert (checked.rank, checked.alpha) == (4, 4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_stream_refuses_non_finite_values_of_every_wire_dtype(
    dtype: torch.dtype, bad: float
) -> None:
    values = tensors(dtype=dtype)
    values[KEY_B][2, 0] = bad
    wire = "float32" if dtype == torch.float32 else "bfloat16"
    data = bytes(save(values, metadata=metadata(dtype=wire)))
    with pytest.raises(LoraFileError) as caught:
        validate_adapter_stream(pieces(data, 64), SPEC, size=len(data))
    assert caught.value.key == KEY_B and caught.value.found == "1 NaN/inf"


def test_a_stream_with_a_bad_header_is_refused_before_its_values_are_read() -> None:
    data = blob(base_model_hash="cd" * 32)
    read: list[int] = []
    with pytest.raises(LoraFileError, match="another base model"):
        validate_adapter_stream(pieces(data, 64, read), SPEC, size=len(data))
    (length,) = struct.unpack("<Q", data[:8])
    assert sum(read) < 8 + length + 64  # the header and at most one chunk more


def test_a_stream_shorter_or_longer_than_its_size_is_refused() -> None:
    data = blob()
    with pytest.raises(LoraFileError, match="header"):
        validate_adapter_stream(pieces(data[:-10], 64), SPEC, size=len(data))
    with pytest.raises(LoraFileError, match="longer"):
        validate_adapter_stream(pieces(data + b"xx", 64), SPEC, size=len(data))


def test_offsets_that_overlap_are_refused() -> None:
    data = blob()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    second = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )[1]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [begin - 2, end - 2]  # overlaps the first tensor
    text = json.dumps(header).encode()
    forged = struct.pack("<Q", len(text)) + text + data[8 + length :]
    error = failure(forged)
    assert error.key == second and "tile" in str(error)
    assert first != second
