"""Dependencies of the aggregator alone: what the base model accepts, and what devices encode with.

Both come from data, never from weights: the base model's facts (`tessera.json`, computed once
by `tessera model inspect`) and the task encoder's config.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Depends

from tessera.lora import LoraSpec
from tessera.model.encoder import task_encoder_info
from tessera.model.facts import ModelFacts, load_facts, resolve_targets
from tessera.service.deps import SettingsDep


@dataclass(frozen=True)
class BaseModelFacts:
    """What uploads and task vectors are checked against."""

    lora_spec: LoraSpec
    model: ModelFacts
    task_encoder_id: str
    task_width: int  # width of the task encoder's vectors (unrelated to the UNet's)


_facts: dict[tuple[str, str, str], BaseModelFacts] = {}
_facts_lock = threading.Lock()


def base_model_facts(path: str, targets: str, task_encoder: str) -> BaseModelFacts:
    """The base model's facts under the federation's LoRA preset, read once per process."""
    key = (path, targets, task_encoder)
    with _facts_lock:
        facts = _facts.get(key)
        if facts is None:
            model = load_facts(path)
            encoder = task_encoder_info(task_encoder)
            facts = BaseModelFacts(
                lora_spec=model.lora_spec(resolve_targets(targets, path)),
                model=model,
                task_encoder_id=encoder.encoder_id,
                task_width=encoder.width,
            )
            _facts[key] = facts
        return facts


def get_base_model_facts(settings: SettingsDep) -> BaseModelFacts:
    return base_model_facts(settings.base_model, settings.lora_targets, settings.task_encoder)


def get_lora_spec(
    facts: Annotated[BaseModelFacts, Depends(get_base_model_facts)], settings: SettingsDep
) -> LoraSpec:
    """The base model's spec, with the LoRA scales this server accepts."""
    return replace(
        facts.lora_spec, min_scale=settings.min_lora_scale, max_scale=settings.max_lora_scale
    )


BaseModelDep = Annotated[BaseModelFacts, Depends(get_base_model_facts)]
LoraSpecDep = Annotated[LoraSpec, Depends(get_lora_spec)]
