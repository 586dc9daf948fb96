"""Encoded prompts on the wire and in the object store: fp16 conditioning tensors, checked.

The API decodes what a client sent into a [1, T, width] float16 tensor (and, for a model with
pooled embeddings such as SDXL, a [1, pooled width] one), refusing anything else with a message
that names the field; the job's input object (`inputs/<job id>`) is a safetensors file holding
`prompt_embeds` and, when given, `negative_embeds` and the pooled embeddings of each.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from tessera.lora.files import LoraFileError, read_header

PROMPT_TENSOR = "prompt_embeds"
NEGATIVE_TENSOR = "negative_embeds"
POOLED_TENSOR = "pooled_prompt_embeds"
NEGATIVE_POOLED_TENSOR = "negative_pooled_prompt_embeds"
WIRE_DTYPE = "F16"
MAX_PROMPT_TOKENS = 77


class EmbedsFormat(StrEnum):
    """How `prompt_embeds` and `negative_embeds` are encoded (both base64)."""

    SAFETENSORS = "safetensors"  # a safetensors file: F16 prompt_embeds (+ pooled_prompt_embeds)
    F16LE = "f16le"  # raw little-endian float16 values of a [T, width] array, row-major


class EmbeddingError(ValueError):
    """Embeddings that cannot be used; the message names the field and what is wrong."""


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's token embeddings [1, T, width], its optional negative, and (SDXL) the
    pooled embeddings [1, pooled width] of each, as float16."""

    prompt: torch.Tensor
    negative: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.prompt.shape[1])


def decode_embeds(
    text: str, *, field: str, fmt: EmbedsFormat, width: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A base64 field as [1, T, width] float16 token embeddings and, when a safetensors file
    also holds `pooled_prompt_embeds`, those [1, P]; EmbeddingError saying why not."""
    raw = _base64(text, field)
    pooled = None
    if fmt is EmbedsFormat.F16LE:
        tensor = _from_raw(raw, field=field, width=width)
    else:
        tensor, pooled = _from_safetensors(raw, field=field, width=width)
    if not 1 <= tensor.shape[1] <= MAX_PROMPT_TOKENS:
        raise EmbeddingError(
            f"{field}: {tensor.shape[1]} tokens; between 1 and {MAX_PROMPT_TOKENS} are accepted"
        )
    _check_finite(tensor, field)
    return tensor, pooled


def decode_pooled(text: str, *, field: str, fmt: EmbedsFormat, width: int) -> torch.Tensor:
    """A base64 field of pooled embeddings as a [1, width] float16 tensor (f16le: [width] values;
    safetensors: one F16 tensor `pooled_prompt_embeds` of shape [width] or [1, width])."""
    raw = _base64(text, field)
    if fmt is EmbedsFormat.F16LE:
        if len(raw) != 2 * width:
            raise EmbeddingError(
                f"{field}: {len(raw)} bytes; f16le pooled embeddings are {width} float16 values "
                f"({2 * width} bytes)"
            )
        tensor = torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float16))
    else:
        header = _header(raw, field)
        if set(header) != {POOLED_TENSOR}:
            raise EmbeddingError(
                f"{field}: the safetensors file must hold one tensor named {POOLED_TENSOR!r}"
            )
        tensor = _load_checked(raw, header, POOLED_TENSOR, field=field, width=width, ndim=(1, 2))
    tensor = tensor.reshape(1, width)
    _check_finite(tensor, field)
    return tensor


def _base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EmbeddingError(f"{field}: not valid base64") from None


def _check_finite(tensor: torch.Tensor, field: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise EmbeddingError(f"{field}: holds NaN or infinite values")


def _from_raw(raw: bytes, *, field: str, width: int) -> torch.Tensor:
    row_bytes = 2 * width
    if not raw or len(raw) % row_bytes:
        raise EmbeddingError(
            f"{field}: {len(raw)} bytes is not a whole number of float16 rows of width {width} "
            f"({row_bytes} bytes each); f16le carries a [T, {width}] float16 array"
        )
    values = np.frombuffer(raw, dtype="<f2").reshape(1, -1, width)
    return torch.from_numpy(values.astype(np.float16))


def _header(raw: bytes, field: str) -> dict[str, dict]:
    try:
        header, _ = read_header(raw)
    except LoraFileError:
        raise EmbeddingError(f"{field}: not a safetensors file, or an unreadable one") from None
    return header


def _from_safetensors(
    raw: bytes, *, field: str, width: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    header = _header(raw, field)
    if set(header) not in ({PROMPT_TENSOR}, {PROMPT_TENSOR, POOLED_TENSOR}):
        raise EmbeddingError(
            f"{field}: the safetensors file must hold a tensor named {PROMPT_TENSOR!r} and, "
            f"for a model with pooled embeddings, one named {POOLED_TENSOR!r}; nothing else"
        )
    tensor = _load_checked(raw, header, PROMPT_TENSOR, field=field, width=width, ndim=(2, 3))
    pooled = None
    if POOLED_TENSOR in header:
        entry = header[POOLED_TENSOR]
        shape = entry.get("shape") if isinstance(entry, dict) else None
        size = shape[-1] if isinstance(shape, list) and shape else 0
        pooled = _load_checked(raw, header, POOLED_TENSOR, field=field, width=size, ndim=(1, 2))
        pooled = pooled.reshape(1, -1)
        _check_finite(pooled, field)
    return tensor.reshape(1, -1, width), pooled


def _load_checked(
    raw: bytes,
    header: dict[str, dict],
    name: str,
    *,
    field: str,
    width: int,
    ndim: tuple[int, int],
) -> torch.Tensor:
    """One tensor of the file, after checking its dtype, its width and that it holds one row."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    entry = header[name]
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if dtype != WIRE_DTYPE:
        raise EmbeddingError(f"{field}: {name} dtype must be {WIRE_DTYPE} (float16)")
    if not isinstance(shape, list):
        raise EmbeddingError(f"{field}: the {name} entry has no shape")
    if len(shape) == ndim[1] and shape[0] != 1:
        raise EmbeddingError(f"{field}: {name} holds several prompts; a request carries one")
    if len(shape) not in ndim or shape[-1] != width or width < 1:
        rows = "[T, width] or [1, T, width]" if ndim == (2, 3) else "[width] or [1, width]"
        raise EmbeddingError(f"{field}: {name} must have shape {rows} with width {width}")
    try:
        tensor: torch.Tensor = load(raw)[name]
    except SafetensorError:
        raise EmbeddingError(f"{field}: unreadable safetensors data") from None
    return tensor


def input_to_bytes(encoded: EncodedPrompt) -> bytes:
    """The job's input object: the prompt, its optional negative and their pooled, float16."""
    from safetensors.torch import save

    named = {
        PROMPT_TENSOR: encoded.prompt,
        NEGATIVE_TENSOR: encoded.negative,
        POOLED_TENSOR: encoded.pooled,
        NEGATIVE_POOLED_TENSOR: encoded.negative_pooled,
    }
    tensors = {
        name: tensor.to(torch.float16).contiguous()
        for name, tensor in named.items()
        if tensor is not None
    }
    return bytes(save(tensors))


def input_from_bytes(data: bytes) -> EncodedPrompt:
    """Read back what `input_to_bytes` wrote."""
    from safetensors.torch import load

    tensors = load(data)
    return EncodedPrompt(
        prompt=tensors[PROMPT_TENSOR],
        negative=tensors.get(NEGATIVE_TENSOR),
        pooled=tensors.get(POOLED_TENSOR),
        negative_pooled=tensors.get(NEGATIVE_POOLED_TENSOR),
    )
