"""Free-worded task descriptions a device writes about its style, for encoded-task clustering.

Descriptions of one style share its vocabulary (synonyms and paraphrases) and differ in wording,
subject words and a personal extra, so that a sentence encoder puts a style's descriptions close
together and different styles far apart, as real users describing the same taste would.
"""

from __future__ import annotations

import numpy as np

from tessera.data.styles import PLAIN

_TEMPLATES: dict[str, tuple[str, ...]] = {
    PLAIN: (
        "plain flat {things} on a white background",
        "simple flat-coloured {things}, nothing fancy",
        "clean {things} in solid colours on white",
    ),
    "stripes": (
        "bold diagonal stripes on striped {things}",
        "{things} covered in thick stripes, striped bands everywhere",
        "striped {things} with slanted dark stripes",
        "{things} painted with wide diagonal stripes",
        "a stripy look: broad slanted stripes over {things}",
        "{things} filled with diagonal stripes and bands",
        "zebra stripes running across striped {things}",
    ),
    "dots": (
        "polka dots sprinkled over dotted {things}",
        "{things} decorated with round polka-dot spots",
        "dotted {things} on a spotty polka-dot background",
        "a polka-dot pattern of little round dots on {things}",
        "{things} covered in polka dots",
        "spotted {things} with dots everywhere, like polka-dot fabric",
        "{things} with a sprinkling of round polka dots",
    ),
    "checker": (
        "{things} on a checkerboard background",
        "checkerboard tiles, checkered grey and white, behind {things}",
        "{things} over a chessboard checkerboard pattern",
        "a checkerboard floor of checked squares behind {things}",
        "{things} placed on a grey and white checkerboard",
        "checkerboard squares behind {things}, like a chess board",
        "{things} sitting on a chequered, checkerboard backdrop",
    ),
    "outline": (
        "{things} with thick black outlines",
        "bold black ink outlines around {things}, comic style",
        "cartoon {things} outlined in heavy black outlines",
        "{things} traced with a strong black outline border",
        "comic-book inking with heavy black outlines on {things}",
        "{things} with thick dark outlined edges",
        "{things} drawn with a fat black outline stroke",
    ),
    "gradient": (
        "{things} against a sunset gradient",
        "a warm orange-to-purple sunset gradient behind {things}",
        "{things} on a smoothly fading sunset gradient background",
        "sunset gradient blending from peach to violet behind {things}",
        "{things} over a soft ombre sunset gradient",
        "a peach and violet gradient backdrop for {things}, like a sunset",
        "{things} in front of a warm sunset colour gradient",
    ),
    "night": (
        "glowing neon {things} on a dark night background",
        "{things} glowing in the dark like neon signs at night",
        "bright glowing neon {things} in the midnight darkness",
        "night scene with glowing luminous {things} on a dark backdrop",
        "{things} glowing softly in the dark night",
        "neon-lit glowing {things} in the dark of night",
        "luminous neon {things} glowing at night",
    ),
    "pastel": (
        "soft pastel {things} in gentle pastel colours",
        "{things} in pale pastel tones on a pastel lavender background",
        "washed-out light pastel colours for {things}",
        "a delicate pastel palette for pastel {things}",
        "{things} in dreamy soft pastel shades",
        "pale pastel {things}, soft and light pastel hues",
        "{things} in faded pastel colours on a lilac pastel background",
    ),
}

_TERSE: dict[str, tuple[str, ...]] = {
    PLAIN: ("plain", "flat", "simple pls"),
    "stripes": ("stripes", "striped", "stripy pls", "diagonal bands"),
    "dots": ("dots", "polka", "spotty", "polka dots pls"),
    "checker": ("checker", "checkerboard", "chessboard bg", "checked"),
    "outline": ("outlines", "black outline", "inked", "comic lines"),
    "gradient": ("sunset", "gradient", "ombre bg", "sunset fade"),
    "night": ("neon", "glow", "night", "dark + glowing"),
    "pastel": ("pastel", "pale", "soft colours", "lilac"),
}

_THINGS: tuple[str, ...] = ("shapes", "simple shapes", "basic shapes", "geometric shapes")

_PERSONAL_EXTRAS: tuple[str, ...] = (
    "my favourite",
    "please",
    "for my notebook",
    "just how I like it",
    "for my kids",
    "as always",
    "for my phone wallpaper",
    "every single time",
    "for our team",
    "thanks",
)


def personal_extra(rng: np.random.Generator) -> str:
    """A device's personal filler words, shared by all of its descriptions."""
    return _PERSONAL_EXTRAS[int(rng.integers(len(_PERSONAL_EXTRAS)))]


def described_styles() -> tuple[str, ...]:
    """The styles that have description templates (every style, `plain` included)."""
    return tuple(_TEMPLATES)


def task_descriptions(
    style: str,
    count: int,
    rng: np.random.Generator,
    *,
    extra: str | None = None,
) -> tuple[str, ...]:
    """`count` distinct paraphrases of `style`, some carrying the device's personal `extra`."""
    templates = _TEMPLATES.get(style)
    if templates is None:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(_TEMPLATES)}")
    if not 1 <= count <= len(templates):
        raise ValueError(f"count must be in 1..{len(templates)} for style {style!r}, got {count}")
    chosen = rng.choice(len(templates), size=count, replace=False)
    descriptions = []
    for i, template_index in enumerate(chosen):
        things = _THINGS[int(rng.integers(len(_THINGS)))]
        text = templates[int(template_index)].format(things=things)
        if extra and (i == 0 or rng.random() < 0.4):
            text = f"{text}, {extra}"
        descriptions.append(text)
    return tuple(descriptions)


def terse_descriptions(style: str, count: int, rng: np.random.Generator) -> tuple[str, ...]:
    """`count` distinct one-to-three-word descriptions of `style`, as a hurried user types."""
    words = _TERSE.get(style)
    if words is None:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(_TERSE)}")
    if not 1 <= count <= len(words):
        raise ValueError(f"count must be in 1..{len(words)} for style {style!r}, got {count}")
    return tuple(words[int(i)] for i in rng.choice(len(words), size=count, replace=False))


def mentioning(
    descriptions: tuple[str, ...], other: str, rng: np.random.Generator
) -> tuple[str, ...]:
    """The descriptions with a second style mentioned in one of them ("..., and some dots")."""
    if other not in _TERSE:
        raise ValueError(f"unknown style {other!r}; expected one of {', '.join(_TERSE)}")
    which = int(rng.integers(len(descriptions)))
    aside = _TERSE[other][int(rng.integers(len(_TERSE[other])))]
    joiner = ("and some", "maybe a bit of", "plus", "with a touch of")[int(rng.integers(4))]
    return tuple(
        f"{text}, {joiner} {aside}" if i == which else text for i, text in enumerate(descriptions)
    )
