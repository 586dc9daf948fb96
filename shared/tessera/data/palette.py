"""The subjects' colours and small colour operations (hue shift, tints) used by the styles."""

from __future__ import annotations

import colorsys

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.13, 0.66, 0.22),
    "blue": (0.13, 0.30, 0.88),
    "yellow": (0.96, 0.84, 0.10),
    "purple": (0.58, 0.20, 0.78),
    "orange": (0.98, 0.52, 0.06),
}

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

WHITE = np.array([1.0, 1.0, 1.0])


def base_colour(colour: str) -> np.ndarray:
    """The RGB triple in [0, 1] of a named subject colour."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(COLOUR_NAMES)}")
    return np.array(COLOURS[colour], dtype=np.float64)


def shift_hue(rgb: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of an RGB triple by `shift` turns (a device's personal tint)."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    return np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v), dtype=np.float64)


def mix(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """Linear blend a*(1-t) + b*t, broadcasting a mask `t` of shape HxW over colour channels."""
    weight = np.asarray(t, dtype=np.float64)
    if weight.ndim == 2:
        weight = weight[..., None]
    return a * (1.0 - weight) + b * weight


def article(word: str) -> str:
    """The indefinite article a caption puts before `word` ("an orange ...", "a red ...")."""
    return "an" if word[:1].lower() in "aeiou" else "a"
