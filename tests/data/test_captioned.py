"""Captioned image folders as common LoRA trainers lay them out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tessera.data.captioned import CaptionedFolderError, load_captioned_folder


def _image(path: Path, size: tuple[int, int], value: int = 200) -> None:
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_jsonl_captions_and_any_image_size(tmp_path: Path) -> None:
    _image(tmp_path / "wide.png", (60, 20), value=255)
    _image(tmp_path / "tall.jpg", (10, 40), value=0)
    rows = [
        {"file_name": "wide.png", "text": "a wide one"},
        {"file_name": "tall.jpg", "caption": "tall"},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    images, captions = load_captioned_folder(tmp_path, 16)

    assert images.shape == (2, 3, 16, 16)
    assert captions == ["tall", "a wide one"]  # sorted by file name
    assert float(images[0].mean()) == pytest.approx(-1.0, abs=0.02)  # black
    assert float(images[1].mean()) == pytest.approx(1.0, abs=0.02)  # white


def test_sidecar_text_files_then_a_json_map(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", (8, 8))
    (tmp_path / "a.txt").write_text("  a square \n")
    _image(tmp_path / "b.webp", (8, 8))  # no sidecar: not part of the set

    images, captions = load_captioned_folder(tmp_path, 8)

    assert captions == ["a square"] and images.shape == (1, 3, 8, 8)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": "x", "b.webp": "y"}))
    assert load_captioned_folder(tmp_path, 8)[1] == ["x", "y"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no captioned images"),
        (
            {"captions.jsonl": '{"file_name": "gone.png", "text": "x"}\n'},
            "gone.png, which is missing",
        ),
        ({"captions.jsonl": "not json\n"}, "captions.jsonl:1"),
        ({"captions.jsonl": '{"file_name": 3, "text": "x"}\n'}, "must be strings"),
        ({"captions.json": '["a list"]'}, "must map each image"),
        ({"captions.json": '{"bad.png": "x"}', "bad.png": "not an image"}, "not a readable image"),
    ],
)
def test_a_bad_folder_is_refused_naming_the_file(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    with pytest.raises(CaptionedFolderError, match=message):
        load_captioned_folder(tmp_path, 16)
