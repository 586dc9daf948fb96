"""Contact sheet of the styles (rows) over a few subjects (columns), to check them by eye."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tessera.data.datasets import rng_for
from tessera.data.styles import STYLES, render

DEFAULT_SUBJECTS: tuple[tuple[str, str], ...] = (
    ("circle", "red"),
    ("square", "green"),
    ("triangle", "blue"),
    ("star", "yellow"),
    ("cross", "purple"),
    ("circle", "orange"),
    ("triangle", "red"),
    ("star", "blue"),
)


def contact_sheet(
    styles: Sequence[str] = STYLES,
    subjects: Sequence[tuple[str, str]] = DEFAULT_SUBJECTS,
    *,
    seed: int = 0,
    border: int = 1,
) -> np.ndarray:
    """A uint8 grid image: one row per style, one column per (shape, colour) subject."""
    rows = []
    for style in styles:
        rng = rng_for("contact-sheet", seed)
        tiles = [render(shape, colour, style, rng) for shape, colour in subjects]
        padded = [
            np.pad(t, ((border, border), (border, border), (0, 0)), constant_values=96)
            for t in tiles
        ]
        rows.append(np.concatenate(padded, axis=1))
    return np.concatenate(rows, axis=0)


def save_contact_sheet(path: Path, *, scale: int = 4, seed: int = 0) -> Path:
    """Write the contact sheet as a PNG, upscaled without smoothing so pixels stay visible."""
    from PIL import Image, ImageDraw

    sheet = contact_sheet(seed=seed)
    grid = Image.fromarray(sheet)
    grid = grid.resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.Resampling.NEAREST)
    label_width = 80
    image = Image.new("RGB", (grid.width + label_width, grid.height), (255, 255, 255))
    image.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(image)
    row_height = grid.height / len(STYLES)
    for row, style in enumerate(STYLES):
        draw.text((6, row * row_height + row_height / 2 - 6), style, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m tessera.data.preview docs/styles.png`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path, nargs="?", default=Path("docs/styles.png"))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_contact_sheet(args.path, scale=args.scale, seed=args.seed))


if __name__ == "__main__":
    main()
