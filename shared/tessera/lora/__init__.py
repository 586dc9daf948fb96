"""LoRA adapters: the data type, the file format and its validator, training and mixing."""

from tessera.lora.adapter import (
    DEFAULT_TARGETS,
    LORA_TARGETS,
    TARGET_PRESETS,
    LoraAdapter,
    LoraSpec,
    lora_spec,
    pair_shapes,
    preset_targets,
    random_adapter,
    unflatten_pair,
    zeros_like_spec,
)
from tessera.lora.files import (
    LoraFileError,
    adapter_from_bytes,
    adapter_to_bytes,
    read_header,
    validate_adapter_bytes,
    validate_adapter_stream,
)

__all__ = [
    "DEFAULT_TARGETS",
    "LORA_TARGETS",
    "TARGET_PRESETS",
    "LoraAdapter",
    "LoraFileError",
    "LoraSpec",
    "adapter_from_bytes",
    "adapter_to_bytes",
    "lora_spec",
    "pair_shapes",
    "preset_targets",
    "random_adapter",
    "read_header",
    "unflatten_pair",
    "validate_adapter_bytes",
    "validate_adapter_stream",
    "zeros_like_spec",
]
