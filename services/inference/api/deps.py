"""Dependencies of the inference API alone: what the base model accepts.

The API process does not load the model: its facts (`tessera.model.facts`) say enough to check
a request (the conditioning width and pooled width, the image size it draws).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from tessera.model.facts import ModelFacts, load_facts
from tessera.service.deps import SettingsDep


def get_model_facts(settings: SettingsDep) -> ModelFacts:
    """The base model's facts (kept in its tessera.json; no weights are read)."""
    return load_facts(settings.base_model)


ModelFactsDep = Annotated[ModelFacts, Depends(get_model_facts)]
