"""A folder of ordinary images with captions, as common LoRA trainers lay it out.

Captions come from `captions.jsonl` (one `{"file_name": ..., "text": ...}` per line, as
Hugging Face's imagefolder uses; `caption` is accepted for `text`), else from a sidecar
`name.txt` beside each image (kohya's layout), else from a `captions.json` map
`{file name: caption}`. Images of any size are resized and centre-cropped to the model's
resolution; PNG, JPEG, WebP and BMP are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tessera.model.latents import IMAGE_SUFFIXES, load_image


class CaptionedFolderError(ValueError):
    """A folder that cannot be trained on; the message names the file and what is wrong."""


def load_captioned_folder(folder: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Images [n, 3, resolution, resolution] in [-1, 1] and one caption per image."""
    captions = _captions(folder)
    if not captions:
        raise CaptionedFolderError(
            f"{folder}: no captioned images (give captions.jsonl, name.txt beside each image, "
            "or captions.json)"
        )
    images = []
    for name in sorted(captions):
        path = folder / name
        if not path.is_file():
            raise CaptionedFolderError(f"{folder}: a caption names {name}, which is missing")
        try:
            images.append(load_image(path, resolution))
        except ValueError as error:
            raise CaptionedFolderError(str(error)) from None
    return torch.stack(images), [captions[name] for name in sorted(captions)]


def _captions(folder: Path) -> dict[str, str]:
    jsonl = folder / "captions.jsonl"
    if jsonl.exists():
        found: dict[str, str] = {}
        for number, line in enumerate(jsonl.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row.get("text", row.get("caption"))
                name = row["file_name"]
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise CaptionedFolderError(
                    f"{jsonl}:{number}: each line must be a JSON object with file_name and text"
                ) from None
            if not isinstance(name, str) or not isinstance(text, str):
                raise CaptionedFolderError(f"{jsonl}:{number}: file_name and text must be strings")
            found[name] = text
        return found
    sidecars = {
        image.name: image.with_suffix(".txt").read_text().strip()
        for image in folder.iterdir()
        if image.suffix.lower() in IMAGE_SUFFIXES and image.with_suffix(".txt").exists()
    }
    if sidecars:
        return sidecars
    mapping = folder / "captions.json"
    if mapping.exists():
        loaded = json.loads(mapping.read_text())
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise CaptionedFolderError(f"{mapping}: must map each image file name to its caption")
        return dict(loaded)
    return {}
