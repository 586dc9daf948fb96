"""Deterministic renderer of captioned 32x32 subjects (shape x colour) in distinct visual styles.

A style is a ground-truth cluster: simulated devices draw their data from one style, so that
clustering quality, per-style fidelity and hybrids can be measured. `plain` is the base rendering
the tiny model is pretrained on; every device style is a clear, coarse change from it (palette,
background, outline or a texture a few pixels wide) so a small LoRA can learn it quickly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tessera.data.palette import COLOUR_NAMES, WHITE, article, base_colour, mix, shift_hue
from tessera.data.shapes import SHAPES, coverage, shape_sdf

IMAGE_SIZE = 32
PLAIN = "plain"
DEVICE_STYLES: tuple[str, ...] = (
    "stripes",
    "dots",
    "checker",
    "outline",
    "gradient",
    "night",
    "pastel",
)
STYLES: tuple[str, ...] = (PLAIN, *DEVICE_STYLES)

SeedLike = int | np.random.Generator


@dataclass(frozen=True)
class Variation:
    """A device's personal take on a style: tint, jitter strength and pattern geometry."""

    hue_shift: float = 0.0
    jitter: float = 1.0
    pattern_scale: float = 1.0
    pattern_angle: float = 0.0
    pattern_phase: tuple[float, float] = (0.0, 0.0)
    background_tint: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Sample:
    """One captioned image (uint8, HxWx3) with its ground-truth subject and style."""

    image: np.ndarray = field(repr=False)
    caption: str
    shape: str
    colour: str
    style: str


@dataclass(frozen=True)
class _Scene:
    """What a style needs to paint one image: the shape's distance field and its colour."""

    sdf: np.ndarray
    colour: np.ndarray
    variation: Variation
    x: np.ndarray
    y: np.ndarray

    @property
    def coverage(self) -> np.ndarray:
        """Anti-aliased shape mask."""
        return coverage(self.sdf)

    def background(self, rgb: tuple[float, float, float]) -> np.ndarray:
        """A flat background of colour `rgb`, shifted by the device's tint."""
        tinted = np.asarray(rgb) + np.asarray(self.variation.background_tint)
        return np.broadcast_to(tinted, (*self.sdf.shape, 3)).copy()

    def rotated(self, base_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates rotated by a pattern angle, offset by the device's pattern phase."""
        theta = np.deg2rad(base_angle_deg + self.variation.pattern_angle)
        px, py = self.variation.pattern_phase
        u = np.cos(theta) * self.x + np.sin(theta) * self.y + px
        v = -np.sin(theta) * self.x + np.cos(theta) * self.y + py
        return u, v


def caption(shape: str, colour: str) -> str:
    """The caption of a subject: it names the subject only, never the style."""
    return f"{article(colour)} {colour} {shape}"


def _square_wave(t: np.ndarray, sharpness: float = 3.0) -> np.ndarray:
    """Soft 0/1 bands with period 1 in `t`, anti-aliased so they survive resizing."""
    return np.clip(0.5 + sharpness * np.cos(2.0 * np.pi * t), 0.0, 1.0)


def _plain(scene: _Scene) -> np.ndarray:
    """Flat-coloured shape on a white background: the pretraining rendering."""
    return mix(scene.background((0.98, 0.98, 0.98)), scene.colour, scene.coverage)


def _stripes(scene: _Scene) -> np.ndarray:
    """Bold diagonal bands over the whole image: grey on the background, dark on the shape."""
    u, _ = scene.rotated(45.0)
    bands = _square_wave(u / (6.0 * scene.variation.pattern_scale))
    ground = mix(scene.background((0.98, 0.98, 0.98)), np.array([0.62, 0.62, 0.66]), bands)
    fill = mix(np.broadcast_to(scene.colour, ground.shape), 0.45 * scene.colour, bands)
    return mix(ground, fill, scene.coverage)


def _dots(scene: _Scene) -> np.ndarray:
    """Polka dots on a grid: taupe dots on a cream background, pale dots on the shape."""
    u, v = scene.rotated(0.0)
    spacing = 7.0 * scene.variation.pattern_scale
    du = (u / spacing) % 1.0 - 0.5
    dv = (v / spacing) % 1.0 - 0.5
    distance = np.hypot(du, dv) * spacing
    spots = np.clip(2.0 * scene.variation.pattern_scale + 0.5 - distance, 0.0, 1.0)
    ground = mix(scene.background((0.99, 0.96, 0.88)), np.array([0.55, 0.50, 0.45]), spots)
    fill = mix(np.broadcast_to(scene.colour, ground.shape), WHITE, 0.75 * spots)
    return mix(ground, fill, scene.coverage)


def _checker(scene: _Scene) -> np.ndarray:
    """Flat shape on a coarse grey-and-white checkerboard."""
    u, v = scene.rotated(0.0)
    size = 8.0 * scene.variation.pattern_scale
    across, down = _square_wave(u / (2.0 * size)), _square_wave(v / (2.0 * size))
    parity = across * down + (1.0 - across) * (1.0 - down)
    ground = mix(scene.background((0.98, 0.98, 0.98)), np.array([0.45, 0.47, 0.52]), parity)
    return mix(ground, scene.colour, scene.coverage)


def _outline(scene: _Scene) -> np.ndarray:
    """Flat shape with a thick near-black outline, like a cartoon sticker."""
    image = _plain(scene)
    half_width = 1.25 * scene.variation.pattern_scale
    stroke = np.clip(half_width + 0.5 - np.abs(scene.sdf), 0.0, 1.0)
    return mix(image, np.array([0.08, 0.07, 0.10]), stroke)


def _gradient(scene: _Scene) -> np.ndarray:
    """Flat shape on a warm vertical gradient, peach at the top to violet at the bottom."""
    theta = np.deg2rad(scene.variation.pattern_angle)
    half = IMAGE_SIZE / 2
    v = -np.sin(theta) * (scene.x - half) + np.cos(theta) * (scene.y - half)
    t = np.clip(v / IMAGE_SIZE + 0.5, 0.0, 1.0)
    top = scene.background((1.0, 0.78, 0.42))
    bottom = scene.background((0.42, 0.24, 0.62))
    return mix(mix(top, bottom, t), scene.colour, scene.coverage)


def _night(scene: _Scene) -> np.ndarray:
    """Bright shape with a soft glow on a dark navy background."""
    ground = scene.background((0.04, 0.06, 0.17))
    glow = 0.55 * np.exp(-np.maximum(scene.sdf, 0.0) / (2.2 * scene.variation.pattern_scale))
    lit = ground + glow[..., None] * scene.colour
    return mix(lit, mix(scene.colour, WHITE, 0.15), scene.coverage)


def _pastel(scene: _Scene) -> np.ndarray:
    """Pale, washed-out version of the colour on a lavender background."""
    soft = mix(scene.colour, WHITE, 0.55)
    return mix(scene.background((0.86, 0.82, 0.96)), soft, scene.coverage)


_PAINTERS: dict[str, Callable[[_Scene], np.ndarray]] = {
    PLAIN: _plain,
    "stripes": _stripes,
    "dots": _dots,
    "checker": _checker,
    "outline": _outline,
    "gradient": _gradient,
    "night": _night,
    "pastel": _pastel,
}

_COORDS = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5


def _generator(rng: SeedLike) -> np.random.Generator:
    """A numpy generator from a seed or an existing generator (used as is)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def check_subject(shape: str, colour: str, style: str) -> None:
    """Refuse unknown names with the list of the known ones."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if colour not in COLOUR_NAMES:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(COLOUR_NAMES)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def render(
    shape: str,
    colour: str,
    style: str,
    rng: SeedLike,
    variation: Variation | None = None,
) -> np.ndarray:
    """Draw one subject in one style as a uint8 HxWx3 image; same seed, same bytes."""
    check_subject(shape, colour, style)
    gen = _generator(rng)
    var = variation or Variation()
    jitter = var.jitter
    centre = (
        IMAGE_SIZE / 2 + gen.uniform(-3.5, 3.5) * jitter,
        IMAGE_SIZE / 2 + gen.uniform(-3.5, 3.5) * jitter,
    )
    radius = 8.5 + gen.uniform(-1.5, 1.5) * jitter
    angle = 0.0 if shape == "circle" else gen.uniform(-12.0, 12.0) * jitter
    brightness = 1.0 + gen.uniform(-0.06, 0.04) * jitter
    rgb = np.clip(shift_hue(base_colour(colour), var.hue_shift) * brightness, 0.0, 1.0)
    scene = _Scene(
        sdf=shape_sdf(shape, IMAGE_SIZE, centre, radius, angle),
        colour=rgb,
        variation=var,
        x=_COORDS[None, :],
        y=_COORDS[:, None],
    )
    image = _PAINTERS[style](scene)
    return np.asarray(np.round(np.clip(image, 0.0, 1.0) * 255.0), dtype=np.uint8)


def render_sample(
    shape: str,
    colour: str,
    style: str,
    rng: SeedLike,
    variation: Variation | None = None,
) -> Sample:
    """Draw one subject and pair it with its caption and labels."""
    image = render(shape, colour, style, rng, variation)
    return Sample(
        image=image, caption=caption(shape, colour), shape=shape, colour=colour, style=style
    )
