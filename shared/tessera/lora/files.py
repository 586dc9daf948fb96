"""LoRA adapter files: safetensors with Tessera metadata, fp16 on the wire, and their validator.

Every upload goes through `validate_adapter_bytes` before anything is stored: it reads the
header first (keys, dtypes, shapes, metadata) and only then the values, and each failure names
the key, what was expected and what was found. An API answers with `LoraFileError.public`,
which leaves out what was found: errors never echo the input.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tessera.lora.adapter import (
    A_SUFFIX,
    B_SUFFIX,
    DEFAULT_TARGETS,
    LORA_TARGETS,
    LoraAdapter,
    LoraSpec,
    pair_shapes,
)

if TYPE_CHECKING:
    import torch

FILE_FORMAT = "tessera-lora/1"
WIRE_DTYPES = {"F16": "float16", "F32": "float32", "BF16": "bfloat16"}
_RESERVED = {
    "format",
    "base_model_id",
    "base_model_hash",
    "rank",
    "alpha",
    "target_modules",
    "targets",
    "dtype",
}
MAX_HEADER_BYTES = 1 << 20
# A tensor entry's shape sits at depth 3 (header object, entry, shape list); metadata at 2.
MAX_HEADER_DEPTH = 4
# More than any base model's adapter has keys (SDXL's `full` preset has a few thousand).
MAX_HEADER_ENTRIES = 20_000
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
KNOWN_KEY = "one of the base model's target modules + .lora_A.weight / .lora_B.weight"
"""What an unknown key's error expected (the file's name for it is never public)."""


class LoraFileError(ValueError):
    """An adapter file that cannot be accepted; `key`, `expected` and `found` say why.

    `key` is a metadata name or one of the base model's keys (never a name taken from the file)
    when the error comes from `validate_adapter_bytes`; `public` is the message without `found`.
    """

    def __init__(
        self, message: str, *, key: str = "", expected: object = None, found: object = None
    ):
        self.key = key
        self.expected = expected
        self.found = found
        named = f"{key}: {message}" if key else message
        expected_fact = [] if expected is None else [f"expected {expected}"]
        found_fact = [] if found is None else [f"found {found}"]
        self.public = _with_facts(named, expected_fact)
        super().__init__(_with_facts(named, expected_fact + found_fact))


def _with_facts(message: str, facts: list[str]) -> str:
    return f"{message} ({', '.join(facts)})" if facts else message


def adapter_to_bytes(adapter: LoraAdapter, dtype: str = "float16") -> bytes:
    """Serialise to safetensors; tensors cast to `dtype` (fp16 on the wire by default).

    The same adapter always gives the same bytes (so the same sha256: a resumed upload is
    recognised): the header's JSON is written with sorted keys, where safetensors orders the
    metadata at random.
    """
    import torch
    from safetensors.torch import save

    torch_dtype = getattr(torch, dtype)
    tensors = {
        k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in adapter.tensors.items()
    }
    metadata = {
        **{str(k): str(v) for k, v in adapter.extra.items()},
        "format": FILE_FORMAT,
        "base_model_id": adapter.base_model_id,
        "base_model_hash": adapter.base_model_hash,
        "rank": str(adapter.rank),
        "alpha": repr(float(adapter.alpha)),
        "target_modules": ",".join(adapter.target_modules),
        "targets": adapter.targets,
        "dtype": dtype,
    }
    return _sorted_header(bytes(save(tensors, metadata=metadata)))


def _sorted_header(data: bytes) -> bytes:
    """A safetensors file with its header's JSON keys sorted (offsets are unchanged: they count
    from the end of the header, which stays padded to 8 bytes as safetensors pads it)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def adapter_from_bytes(
    data: bytes, spec: LoraSpec | None = None, max_bytes: int | None = None
) -> LoraAdapter:
    """Parse (and, given a spec, fully validate) a file; tensors come back as float32."""
    if spec is not None:
        return validate_adapter_bytes(data, spec, max_bytes=max_bytes)
    _, metadata = read_header(data)
    rank, alpha = _rank_alpha(metadata)
    return _build(data, metadata, rank, alpha)


def read_header(data: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and the metadata of a safetensors blob, without reading the values.

    Each entry is checked to carry a string `dtype`, a `shape` of non-negative integers and
    `data_offsets` [begin, end].
    """
    header, metadata = _parse_header(data)
    for key, entry in header.items():
        _check_header_entry(key, entry)
    return header, metadata


def _parse_header(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The header's JSON object (entries unchecked) and its string metadata."""
    length = _header_length(data[:8], size=len(data))
    return _parse_header_text(data[8 : 8 + length])


def _header_length(prefix: bytes, *, size: int) -> int:
    """The header's length from a file's first 8 bytes, checked against the file's `size`."""
    if size < 8 or len(prefix) < 8:
        raise LoraFileError("not a safetensors file", expected=">= 8 bytes", found=size)
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise LoraFileError(
            "safetensors header length is out of range",
            expected=f"<= {min(MAX_HEADER_BYTES, size - 8)} bytes",
            found=length,
        )
    return int(length)


def _parse_header_text(text: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The header's JSON object (entries unchecked) and its string metadata, from its text."""
    _check_nesting(text)
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraFileError(
            f"safetensors header is not valid JSON: {exc.msg} at byte {exc.pos}"
        ) from None
    except ValueError:  # bad UTF-8, or an integer past Python's digit limit
        raise LoraFileError("safetensors header is not valid UTF-8 JSON") from None
    except RecursionError:
        raise LoraFileError("safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise LoraFileError("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraFileError("__metadata__ must map names to strings")
    if len(header) > MAX_HEADER_ENTRIES or len(metadata) > MAX_HEADER_ENTRIES:
        raise LoraFileError(
            "safetensors header has too many entries",
            expected=f"<= {MAX_HEADER_ENTRIES} tensors and <= {MAX_HEADER_ENTRIES} metadata names",
        )
    return header, metadata


def _check_nesting(text: bytes) -> None:
    """Refuse a header nested deeper than a safetensors header is, before parsing it.

    Brackets inside strings do not count; the scan is linear (no parser recursion).
    """
    structure = np.frombuffer(_JSON_STRING.sub(b'""', text), dtype=np.uint8)
    opens = (structure == ord("{")) | (structure == ord("["))
    closes = (structure == ord("}")) | (structure == ord("]"))
    depth = np.cumsum(opens.astype(np.int64) - closes.astype(np.int64))
    if depth.size and int(depth.max()) > MAX_HEADER_DEPTH:
        raise LoraFileError(
            "safetensors header is nested too deeply", expected=f"<= {MAX_HEADER_DEPTH} levels"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header_entry(key: str, entry: object) -> None:
    """A tensor entry needs a string dtype, a shape listing non-negative integers and
    data_offsets [begin, end] with 0 <= begin <= end."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise LoraFileError(
            "malformed tensor entry",
            key=key,
            expected="an object with dtype, shape and data_offsets",
            found=reprlib.repr(entry),
        )
    if not isinstance(entry["dtype"], str):
        raise LoraFileError(
            "dtype must be a string",
            key=key,
            expected="a string",
            found=reprlib.repr(entry["dtype"]),
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise LoraFileError(
            "shape must list non-negative integers",
            key=key,
            expected="a list of integers >= 0",
            found=reprlib.repr(shape),
        )
    offsets = entry["data_offsets"]
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(n) for n in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise LoraFileError(
            "data_offsets must be [begin, end]",
            key=key,
            expected="two integers, 0 <= begin <= end",
            found=reprlib.repr(offsets),
        )


HEADER_ENTRY_BYTES = 128  # a tensor entry's JSON beside its key: dtype, shape, data_offsets
METADATA_BYTES = 64 * 1024  # the metadata's JSON, Tessera's own fields and any extra ones


def largest_update_bytes(spec: LoraSpec) -> int:
    """Size of the largest file `validate_adapter_bytes` can accept for `spec`: every target
    module at the highest rank in float32, plus a header with room for metadata."""
    values = 0
    header = 8 + METADATA_BYTES
    for module, shape in spec.modules.items():
        a_shape, b_shape = pair_shapes(shape, spec.max_rank)
        values += 4 * (math.prod(a_shape) + math.prod(b_shape))
        header += 2 * (len(module) + len(A_SUFFIX) + HEADER_ENTRY_BYTES)
    return values + header


def validate_adapter_bytes(
    data: bytes, spec: LoraSpec, *, max_bytes: int | None = None
) -> LoraAdapter:
    """Check a file against a base model's spec and return the adapter, or raise LoraFileError.

    The checks are `validate_adapter_stream`'s, over the bytes at hand.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise LoraFileError("file is too large", expected=f"<= {max_bytes} bytes", found=len(data))
    checked = validate_adapter_stream([data], spec, size=len(data))
    return _build(data, checked.metadata, checked.rank, checked.alpha)


@dataclass(frozen=True)
class CheckedFile:
    """What validating a file found: its metadata, rank and alpha (the values stay unread)."""

    metadata: dict[str, str]
    rank: int
    alpha: float


def validate_adapter_stream(
    chunks: Iterable[bytes], spec: LoraSpec, *, size: int, max_bytes: int | None = None
) -> CheckedFile:
    """Check a file of `size` bytes, read once from `chunks`, against a base model's spec.

    Checks, in order: size, header, format, base model (id and hash), target preset, rank and
    alpha, the exact set of keys, each tensor's dtype and shape, that the tensors tile the data
    as safetensors lays them out, then that every value is finite (VALUE_CHUNK_BYTES at a time).
    A bad header stops the reading: the values of a refused file are never read.
    """
    if max_bytes is not None and size > max_bytes:
        raise LoraFileError("file is too large", expected=f"<= {max_bytes} bytes", found=size)
    reader = _ChunkReader(chunks)
    length = _header_length(reader.read(8), size=size)
    text = reader.read(length)
    if len(text) < length:
        raise LoraFileError("file is shorter than its header", expected=f"{size} bytes")
    # The keys are checked against the spec before their entries, so that an error names only
    # the spec's keys, never one taken from the file.
    header, metadata = _parse_header_text(text)
    rank, alpha = _check_metadata(metadata, spec)
    _check_keys(header, spec)
    dtype = metadata.get("dtype")
    for key, entry in sorted(header.items()):
        _check_header_entry(key, entry)
        _check_entry(key, entry, spec, rank, dtype)
    for key, wire, nbytes in _layout(header, data_bytes=size - 8 - length):
        _check_finite(key, wire, reader, nbytes)
    if reader.read(1):
        raise LoraFileError("file is longer than its header says", expected=f"{size} bytes")
    return CheckedFile(metadata=metadata, rank=rank, alpha=alpha)


def _check_metadata(metadata: Mapping[str, str], spec: LoraSpec) -> tuple[int, float]:
    """Format, base model, target preset, rank and scale; the file's rank and alpha."""
    found_format = metadata.get("format")
    if found_format != FILE_FORMAT:
        raise LoraFileError(
            "unknown file format", key="format", expected=FILE_FORMAT, found=found_format
        )
    for name, expected in (
        ("base_model_id", spec.base_model_id),
        ("base_model_hash", spec.base_model_hash),
    ):
        if metadata.get(name) != expected:
            raise LoraFileError(
                "adapter was trained for another base model",
                key=name,
                expected=expected,
                found=metadata.get(name),
            )
    found_targets = metadata.get("targets", DEFAULT_TARGETS)
    if found_targets != spec.targets:
        raise LoraFileError(
            f"adapter targets another preset; this base takes preset {spec.targets!r}",
            key="targets",
            expected=spec.targets,
            found=found_targets,
        )
    rank, alpha = _rank_alpha(metadata)
    if not 1 <= rank <= spec.max_rank:
        raise LoraFileError(
            "rank out of range", key="rank", expected=f"1..{spec.max_rank}", found=rank
        )
    if not spec.min_scale <= alpha / rank <= spec.max_scale:
        raise LoraFileError(
            "the LoRA scale alpha / rank is out of range",
            key="alpha",
            expected=f"alpha / rank in [{spec.min_scale:g}, {spec.max_scale:g}]",
            found=alpha / rank,
        )
    return rank, alpha


_ITEM_BYTES = {"F16": 2, "BF16": 2, "F32": 4}
VALUE_CHUNK_BYTES = 1 << 20


def _layout(header: Mapping[str, Any], *, data_bytes: int) -> list[tuple[str, str, int]]:
    """(key, dtype, bytes) of each tensor in file order, once they are shown to tile the
    `data_bytes` after the header exactly, as safetensors requires: no gap, no overlap."""
    position = 0
    tiles = []
    for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * _ITEM_BYTES[entry["dtype"]]
        if begin != position or end - begin != nbytes:
            raise LoraFileError(
                "data_offsets in the header do not tile the data (a gap or an overlap)",
                key=key,
                expected=f"[{position}, {position + nbytes}]",
                found=[begin, end],
            )
        position = end
        tiles.append((key, entry["dtype"], nbytes))
    if position != data_bytes:
        raise LoraFileError(
            "the file's data does not match its header (truncated, or bytes past the tensors)",
            expected=f"{position} bytes of values",
            found=data_bytes,
        )
    return tiles


# Exponent bits that are all set in inf and NaN, and only there.
_NON_FINITE_MASK = {"F16": 0x7C00, "BF16": 0x7F80}


def _check_finite(key: str, wire: str, reader: _ChunkReader, nbytes: int) -> None:
    """Read one tensor's values `VALUE_CHUNK_BYTES` at a time; refuse any NaN or inf."""
    bad = 0
    step = VALUE_CHUNK_BYTES - VALUE_CHUNK_BYTES % _ITEM_BYTES[wire]
    left = nbytes
    while left:
        raw = reader.read(min(step, left))
        if not raw:
            raise LoraFileError("file is shorter than its header says", key=key)
        left -= len(raw)
        if wire == "F32":
            bad += int((~np.isfinite(np.frombuffer(raw, dtype="<f4"))).sum())
        else:
            mask = _NON_FINITE_MASK[wire]
            bad += int(((np.frombuffer(raw, dtype="<u2") & mask) == mask).sum())
    if bad:
        raise LoraFileError(
            "values must be finite", key=key, expected="0 NaN/inf", found=f"{bad} NaN/inf"
        )


class _ChunkReader:
    """Reads exact byte counts from an iterable of chunks, one chunk held at a time."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._current = memoryview(b"")
        self._position = 0

    def read(self, count: int) -> bytes:
        """The next `count` bytes, fewer only at the end of the stream."""
        parts = []
        while count > 0:
            if self._position >= len(self._current):
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._current, self._position = memoryview(chunk), 0
                continue
            part = self._current[self._position : self._position + count]
            self._position += len(part)
            count -= len(part)
            parts.append(part)
        return b"".join(parts)


def _rank_alpha(metadata: Mapping[str, str]) -> tuple[int, float]:
    try:
        rank = int(metadata.get("rank", ""))
    except ValueError:
        raise LoraFileError(
            "rank must be an integer", key="rank", expected="an integer", found=metadata.get("rank")
        ) from None
    try:
        alpha = float(metadata.get("alpha", ""))
    except ValueError:
        raise LoraFileError(
            "alpha must be a number", key="alpha", expected="a number", found=metadata.get("alpha")
        ) from None
    if not (alpha > 0 and alpha < float("inf")):
        raise LoraFileError(
            "alpha must be positive and finite", key="alpha", expected="> 0", found=alpha
        )
    return rank, alpha


def _check_keys(header: Mapping[str, object], spec: LoraSpec) -> None:
    found = set(header)
    expected = spec.keys
    unknown = sorted(found - expected)
    if unknown:
        raise LoraFileError(
            f"unknown key for base model {spec.base_model_id} ({len(unknown)} unknown)",
            expected=KNOWN_KEY,
            found=unknown[0],
        )
    missing = sorted(expected - found)
    if missing:
        raise LoraFileError(
            f"key missing ({len(missing)} missing)",
            key=missing[0],
            expected="present",
            found="absent",
        )


def _check_entry(
    key: str, entry: Mapping[str, object], spec: LoraSpec, rank: int, dtype: str | None
) -> None:
    """dtype as in the metadata; shape A [rank, in(, kh, kw)] or B [out, rank(, 1, 1)]."""
    wire = WIRE_DTYPES.get(str(entry["dtype"]))
    if wire is None:
        raise LoraFileError(
            "unsupported dtype", key=key, expected="/".join(WIRE_DTYPES), found=entry["dtype"]
        )
    if dtype is not None and wire != dtype:
        raise LoraFileError(
            "dtype differs from the file's metadata", key=key, expected=dtype, found=wire
        )
    module = key[: -len(A_SUFFIX)] if key.endswith(A_SUFFIX) else key[: -len(B_SUFFIX)]
    a_shape, b_shape = pair_shapes(spec.modules[module], rank)
    want = list(a_shape if key.endswith(A_SUFFIX) else b_shape)
    if entry["shape"] != want:
        raise LoraFileError("wrong shape", key=key, expected=want, found=entry["shape"])


def _build(data: bytes, metadata: Mapping[str, str], rank: int, alpha: float) -> LoraAdapter:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = load(data)
    except SafetensorError as exc:
        raise LoraFileError(f"unreadable safetensors data: {exc}") from None
    tensors: dict[str, torch.Tensor] = {k: v.float() for k, v in raw.items()}
    targets = tuple(t for t in metadata.get("target_modules", "").split(",") if t)
    return LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=metadata.get("base_model_id", ""),
        base_model_hash=metadata.get("base_model_hash", ""),
        target_modules=targets or LORA_TARGETS,
        extra={k: v for k, v in metadata.items() if k not in _RESERVED},
        targets=metadata.get("targets", DEFAULT_TARGETS),
    )
