"""Encoded prompts on the wire and in the object store: fp16 token embeddings, checked.

The API decodes what a client sent into a [1, T, width] float16 tensor, refusing anything
else with a message that names the field; the job's input object (`inputs/<job id>`) is a
safetensors file holding `prompt_embeds` and, when given, `negative_embeds`.
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
WIRE_DTYPE = "F16"
MAX_PROMPT_TOKENS = 77


class EmbedsFormat(StrEnum):
    """How `prompt_embeds` and `negative_embeds` are encoded (both base64)."""

    SAFETENSORS = "safetensors"  # a safetensors file with one F16 tensor named prompt_embeds
    F16LE = "f16le"  # raw little-endian float16 values of a [T, width] array, row-major


class EmbeddingError(ValueError):
    """Embeddings that cannot be used; the message names the field and what is wrong."""


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's token embeddings [1, T, width] and its optional negative, as float16."""

    prompt: torch.Tensor
    negative: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.prompt.shape[1])


def decode_embeds(text: str, *, field: str, fmt: EmbedsFormat, width: int) -> torch.Tensor:
    """A base64 field as a [1, T, width] float16 tensor, or EmbeddingError saying why not."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EmbeddingError(f"{field}: not valid base64") from None
    if fmt is EmbedsFormat.F16LE:
        tensor = _from_raw(raw, field=field, width=width)
    else:
        tensor = _from_safetensors(raw, field=field, width=width)
    if not 1 <= tensor.shape[1] <= MAX_PROMPT_TOKENS:
        raise EmbeddingError(
            f"{field}: {tensor.shape[1]} tokens; between 1 and {MAX_PROMPT_TOKENS} are accepted"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise EmbeddingError(f"{field}: holds NaN or infinite values")
    return tensor


def _from_raw(raw: bytes, *, field: str, width: int) -> torch.Tensor:
    row_bytes = 2 * width
    if not raw or len(raw) % row_bytes:
        raise EmbeddingError(
            f"{field}: {len(raw)} bytes is not a whole number of float16 rows of width {width} "
            f"({row_bytes} bytes each); f16le carries a [T, {width}] float16 array"
        )
    values = np.frombuffer(raw, dtype="<f2").reshape(1, -1, width)
    return torch.from_numpy(values.astype(np.float16))


def _from_safetensors(raw: bytes, *, field: str, width: int) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        header, _ = read_header(raw)
    except LoraFileError as error:
        raise EmbeddingError(f"{field}: not a safetensors file ({error})") from None
    if set(header) != {PROMPT_TENSOR}:
        raise EmbeddingError(
            f"{field}: the safetensors file must hold exactly one tensor named "
            f"{PROMPT_TENSOR!r}, found {sorted(header)[:5]}"
        )
    entry = header[PROMPT_TENSOR]
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if dtype != WIRE_DTYPE:
        raise EmbeddingError(f"{field}: dtype must be {WIRE_DTYPE} (float16), found {dtype}")
    if not isinstance(shape, list):
        raise EmbeddingError(f"{field}: the tensor entry has no shape")
    if len(shape) == 3 and shape[0] != 1:
        raise EmbeddingError(
            f"{field}: holds {shape[0]} prompts; a request carries one (shape [1, T, {width}])"
        )
    if len(shape) not in (2, 3) or shape[-1] != width:
        raise EmbeddingError(
            f"{field}: shape must be [T, {width}] or [1, T, {width}], found {shape}"
        )
    try:
        tensor = load(raw)[PROMPT_TENSOR]
    except SafetensorError as error:
        raise EmbeddingError(f"{field}: unreadable safetensors data ({error})") from None
    return tensor.reshape(1, -1, width)


def input_to_bytes(encoded: EncodedPrompt) -> bytes:
    """The job's input object: the prompt and its optional negative, float16."""
    from safetensors.torch import save

    tensors = {PROMPT_TENSOR: encoded.prompt.to(torch.float16).contiguous()}
    if encoded.negative is not None:
        tensors[NEGATIVE_TENSOR] = encoded.negative.to(torch.float16).contiguous()
    return bytes(save(tensors))


def input_from_bytes(data: bytes) -> EncodedPrompt:
    """Read back what `input_to_bytes` wrote."""
    from safetensors.torch import load

    tensors = load(data)
    return EncodedPrompt(prompt=tensors[PROMPT_TENSOR], negative=tensors.get(NEGATIVE_TENSOR))
