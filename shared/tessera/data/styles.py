"""Deterministic renderer of captioned 32x32 subjects (shape x colour) in distinct visual styles.

A style is a ground-truth cluster: simulated devices draw their data from one style, so that
clustering quality, per-style fidelity and hybrids can be measured. Every style is a `Look`, a
combination of four independent attributes (background palette, texture, stroke, fill), so two
styles that change different attributes have a well-defined combined rendering, which is what a
hybrid of their adapters should draw. `plain` is the base rendering the tiny model is pretrained
on; every device style is a clear, coarse change of one or two attributes.
"""

from __future__ import annotations

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

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "palette": ("white", "cream", "lavender", "navy", "sunset"),
    "texture": ("none", "stripes", "dots", "checker"),
    "stroke": ("none", "outline", "glow"),
    "fill": ("solid", "pale"),
}


@dataclass(frozen=True)
class Look:
    """One value per attribute; the defaults are the plain look."""

    palette: str = "white"
    texture: str = "none"
    stroke: str = "none"
    fill: str = "solid"

    def __post_init__(self) -> None:
        for attribute, value in self.values().items():
            if value not in ATTRIBUTES[attribute]:
                known = ", ".join(ATTRIBUTES[attribute])
                raise ValueError(f"unknown {attribute} {value!r}; expected one of {known}")

    def values(self) -> dict[str, str]:
        """Attribute name to value, in the order of `ATTRIBUTES`."""
        return {attribute: getattr(self, attribute) for attribute in ATTRIBUTES}

    def changes(self) -> dict[str, str]:
        """The attributes this look sets away from plain: what makes a style recognisable."""
        plain = Look().values()
        return {a: v for a, v in self.values().items() if v != plain[a]}

    def combined(self, other: Look) -> Look | None:
        """Both looks' changes at once, or None where they set one attribute differently."""
        mine, theirs = self.changes(), other.changes()
        if any(mine[a] != theirs[a] for a in mine.keys() & theirs.keys()):
            return None
        return Look(**{**self.values(), **mine, **theirs})


LOOKS: dict[str, Look] = {
    PLAIN: Look(),
    "stripes": Look(texture="stripes"),
    "dots": Look(palette="cream", texture="dots"),
    "checker": Look(texture="checker"),
    "outline": Look(stroke="outline"),
    "gradient": Look(palette="sunset"),
    "night": Look(palette="navy", stroke="glow"),
    "pastel": Look(palette="lavender", fill="pale"),
}


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


LOOK_WORDS: dict[str, dict[str, str]] = {
    "palette": {"white": "", "cream": "on cream", "lavender": "on lavender", "navy": "on navy",
                "sunset": "on a sunset gradient"},
    "texture": {"none": "", "stripes": "with stripes", "dots": "with dots",
                "checker": "with a checkerboard"},
    "stroke": {"none": "", "outline": "outlined", "glow": "glowing"},
    "fill": {"solid": "", "pale": "pale"},
}  # fmt: skip


def look_caption(shape: str, colour: str, look: Look) -> str:
    """A caption that names the look too (pretraining only: device captions never do)."""
    words = [LOOK_WORDS[a][v] for a, v in look.values().items() if LOOK_WORDS[a][v]]
    return ", ".join([caption(shape, colour), *words])


def _all_looks() -> tuple[Look, ...]:
    from itertools import product

    return tuple(Look(*values) for values in product(*ATTRIBUTES.values()))


# Every combination of attributes except the styles' own looks: what the base model learns to
# draw when a caption names it, so that a style is a new combination of things it can draw,
# as a real base model can draw stripes and a cream background before any LoRA.
PRETRAINING_LOOKS: tuple[Look, ...] = tuple(
    look for look in _all_looks() if look not in set(LOOKS.values())
)


def _square_wave(t: np.ndarray, sharpness: float = 3.0) -> np.ndarray:
    """Soft 0/1 bands with period 1 in `t`, anti-aliased so they survive resizing."""
    return np.clip(0.5 + sharpness * np.cos(2.0 * np.pi * t), 0.0, 1.0)


_FLAT_GROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (0.98, 0.98, 0.98),
    "cream": (0.99, 0.96, 0.88),
    "lavender": (0.86, 0.82, 0.96),
    "navy": (0.04, 0.06, 0.17),
}


def _ground(scene: _Scene, palette: str) -> np.ndarray:
    """The background: a flat colour, or the warm sunset gradient (peach top, violet bottom)."""
    if palette != "sunset":
        return scene.background(_FLAT_GROUNDS[palette])
    theta = np.deg2rad(scene.variation.pattern_angle)
    half = IMAGE_SIZE / 2
    v = -np.sin(theta) * (scene.x - half) + np.cos(theta) * (scene.y - half)
    t = np.clip(v / IMAGE_SIZE + 0.5, 0.0, 1.0)
    return mix(scene.background((1.0, 0.78, 0.42)), scene.background((0.42, 0.24, 0.62)), t)


def _textured(
    scene: _Scene, texture: str, ground: np.ndarray, fill: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lay a texture over the ground and the shape's fill (both HxWx3): (ground, fill)."""
    if texture == "stripes":  # bold diagonal bands: grey on the ground, dark on the shape
        u, _ = scene.rotated(45.0)
        bands = _square_wave(u / (6.0 * scene.variation.pattern_scale))
        return mix(ground, np.array([0.62, 0.62, 0.66]), bands), mix(fill, 0.45 * fill, bands)
    if texture == "dots":  # polka dots on a grid: taupe on the ground, pale on the shape
        u, v = scene.rotated(0.0)
        spacing = 7.0 * scene.variation.pattern_scale
        du = (u / spacing) % 1.0 - 0.5
        dv = (v / spacing) % 1.0 - 0.5
        distance = np.hypot(du, dv) * spacing
        spots = np.clip(2.0 * scene.variation.pattern_scale + 0.5 - distance, 0.0, 1.0)
        return mix(ground, np.array([0.55, 0.50, 0.45]), spots), mix(fill, WHITE, 0.75 * spots)
    if texture == "checker":  # a coarse grey-and-white checkerboard behind a flat shape
        u, v = scene.rotated(0.0)
        size = 8.0 * scene.variation.pattern_scale
        across, down = _square_wave(u / (2.0 * size)), _square_wave(v / (2.0 * size))
        parity = across * down + (1.0 - across) * (1.0 - down)
        return mix(ground, np.array([0.45, 0.47, 0.52]), parity), fill
    return ground, fill


def _paint(scene: _Scene, look: Look) -> np.ndarray:
    """Compose a look: ground, texture, glow, the shape's fill, then the outline on top."""
    colour = scene.colour if look.fill == "solid" else mix(scene.colour, WHITE, 0.55)
    ground = _ground(scene, look.palette)
    ground, fill = _textured(scene, look.texture, ground, np.broadcast_to(colour, ground.shape))
    if look.stroke == "glow":  # a soft halo around a brightened shape
        halo = 0.55 * np.exp(-np.maximum(scene.sdf, 0.0) / (2.2 * scene.variation.pattern_scale))
        ground = ground + halo[..., None] * colour
        fill = np.broadcast_to(mix(colour, WHITE, 0.15), ground.shape)
    image = mix(ground, fill, scene.coverage)
    if look.stroke == "outline":  # a thick near-black outline, like a cartoon sticker
        half_width = 1.25 * scene.variation.pattern_scale
        ink = np.clip(half_width + 0.5 - np.abs(scene.sdf), 0.0, 1.0)
        image = mix(image, np.array([0.08, 0.07, 0.10]), ink)
    return image


_COORDS = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5


def _generator(rng: SeedLike) -> np.random.Generator:
    """A numpy generator from a seed or an existing generator (used as is)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def check_subject(shape: str, colour: str, style: str | Look) -> None:
    """Refuse unknown names with the list of the known ones (a `Look` checks itself)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if colour not in COLOUR_NAMES:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(COLOUR_NAMES)}")
    if not isinstance(style, Look) and style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def render(
    shape: str,
    colour: str,
    style: str | Look,
    rng: SeedLike,
    variation: Variation | None = None,
) -> np.ndarray:
    """Draw one subject in a style (or any look) as a uint8 HxWx3 image; same seed, same bytes."""
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
    image = _paint(scene, style if isinstance(style, Look) else LOOKS[style])
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
