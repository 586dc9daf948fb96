"""Dependencies of the aggregator alone: what the base model accepts, and the clustering client."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from tessera.lora import LoraSpec
from tessera.service.deps import SettingsDep

# Assigning one device is a nearest-centroid lookup (or, the very first time, one k-means).


@dataclass(frozen=True)
class BaseModelFacts:
    """What uploads are checked against: the base model's LoRA spec and its text encoder."""

    lora_spec: LoraSpec
    text_encoder_id: str
    embed_dim: int  # width of the encoder's vectors: the UNet's cross-attention width


_facts: dict[str, BaseModelFacts] = {}
_facts_lock = threading.Lock()


def base_model_facts(path: str) -> BaseModelFacts:
    """Load the base model at `path` once per process and keep only its spec and encoder id."""
    with _facts_lock:
        facts = _facts.get(path)
        if facts is None:
            from tessera.model.base import load_base_model

            model = load_base_model(path)
            facts = BaseModelFacts(
                lora_spec=model.lora_spec,
                text_encoder_id=model.text_encoder_id,
                embed_dim=int(model.unet.config.cross_attention_dim),
            )
            _facts[path] = facts  # the UNet itself goes with `model`
        return facts


def get_base_model_facts(settings: SettingsDep) -> BaseModelFacts:
    return base_model_facts(settings.base_model)


def get_lora_spec(facts: Annotated[BaseModelFacts, Depends(get_base_model_facts)]) -> LoraSpec:
    return facts.lora_spec


BaseModelDep = Annotated[BaseModelFacts, Depends(get_base_model_facts)]
LoraSpecDep = Annotated[LoraSpec, Depends(get_lora_spec)]
