"""LoRA adapters: the data type, the file format and its validator, training and mixing."""

from tessera.lora.adapter import (
    LORA_TARGETS,
    LoraAdapter,
    LoraSpec,
    lora_spec,
    random_adapter,
    weights_fingerprint,
    zeros_like_spec,
)
from tessera.lora.files import (
    LoraFileError,
    adapter_from_bytes,
    adapter_to_bytes,
    read_header,
    validate_adapter_bytes,
)

__all__ = [
    "LORA_TARGETS",
    "LoraAdapter",
    "LoraFileError",
    "LoraSpec",
    "adapter_from_bytes",
    "adapter_to_bytes",
    "lora_spec",
    "random_adapter",
    "read_header",
    "validate_adapter_bytes",
    "weights_fingerprint",
    "zeros_like_spec",
]
