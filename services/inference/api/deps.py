"""Dependencies of the inference API: what the base model accepts, and the clustering client.

The API process does not load the model: its config files say enough to check a request
(the encoder width the UNet attends to, the image size it draws).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import Depends

from tessera.service.deps import SettingsDep

# Routing one prompt vector is a dot product per centroid.


@dataclass(frozen=True)
class ModelFacts:
    """The base model's token-embedding width and its native image size (the only one allowed)."""

    embed_dim: int
    image_size: int

    @property
    def allowed_sizes(self) -> tuple[int, ...]:
        return (self.image_size,)


@lru_cache(maxsize=4)
def model_facts(path: str) -> ModelFacts:
    """Read the UNet's (and the VAE's, if any) config.json from the diffusers folder at `path`."""
    folder = Path(path)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    size = int(unet["sample_size"])
    vae_config = folder / "vae" / "config.json"
    if vae_config.is_file():
        vae = json.loads(vae_config.read_text())
        size *= 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return ModelFacts(embed_dim=int(unet["cross_attention_dim"]), image_size=size)


def get_model_facts(settings: SettingsDep) -> ModelFacts:
    return model_facts(settings.base_model)


ModelFactsDep = Annotated[ModelFacts, Depends(get_model_facts)]
