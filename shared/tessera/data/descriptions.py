"""Free-worded task descriptions a device writes about its style, for encoded-task clustering.

Descriptions of one style share its vocabulary (synonyms and paraphrases) and differ in wording,
subject words and a personal extra, so that a sentence encoder puts a style's descriptions close
together and different styles far apart, as real users describing the same taste would.
"""

from __future__ import annotations

import numpy as np

from tessera.data.styles import DEVICE_STYLES, PLAIN

_TEMPLATES: dict[str, tuple[str, ...]] = {
    PLAIN: (
        "plain flat {things} on a white background",
        "simple flat-coloured {things}, nothing fancy",
        "clean {things} in solid colours on white",
    ),
    "stripes": (
        "bold diagonal stripes on {things}",
        "{things} covered in thick striped bands",
        "striped {things} with slanted dark bars",
        "{things} painted with wide diagonal stripes",
        "a stripy look: broad slanted stripes over {things} and the background",
        "{things} filled with diagonal bands",
        "zebra-like stripes running across {things}",
    ),
    "dots": (
        "polka dots sprinkled over {things}",
        "{things} decorated with round polka-dot spots",
        "dotted {things} on a spotty cream background",
        "a polka-dot pattern of little round dots on {things}",
        "{things} covered in polka dots",
        "spotted {things}, dots everywhere like polka-dot fabric",
        "{things} with a sprinkling of round spots",
    ),
    "checker": (
        "{things} on a checkerboard background",
        "checkered grey and white tiles behind {things}",
        "{things} over a chessboard pattern of squares",
        "a checked tile floor behind {things}",
        "{things} placed on a black and white checkerboard",
        "checkerboard squares behind {things}, like a chess board",
        "{things} sitting on a chequered backdrop",
    ),
    "outline": (
        "{things} with thick black outlines",
        "bold dark ink contours around {things}, comic style",
        "cartoon {things} outlined in heavy black lines",
        "{things} traced with a strong black border",
        "comic-book inking with heavy outlines on {things}",
        "sticker-like {things} with thick dark edges",
        "{things} drawn with a fat black outline stroke",
    ),
    "gradient": (
        "{things} against a sunset gradient",
        "a warm orange-to-purple gradient behind {things}",
        "{things} on a smoothly fading sunset-coloured background",
        "sunset colours blending from peach to violet behind {things}",
        "{things} over a soft ombre colour gradient",
        "a peach and violet gradient backdrop for {things}",
        "{things} in front of a warm sunset colour fade",
    ),
    "night": (
        "glowing neon {things} on a dark night background",
        "{things} shining in the dark like neon signs at night",
        "bright glowing {things} against a midnight navy darkness",
        "night scene with luminous {things} on a black backdrop",
        "{things} glowing softly in the darkness",
        "neon-lit {things} in the dark of night",
        "luminous glowing {things} at midnight",
    ),
    "pastel": (
        "soft pastel {things} in gentle muted colours",
        "{things} in pale pastel tones on a lavender background",
        "washed-out light pastel colours for {things}",
        "a delicate pastel palette for {things}",
        "{things} in dreamy pastel shades",
        "pale pastel {things}, soft and light",
        "{things} in faded pastel colours on lilac",
    ),
}

_THINGS: tuple[str, ...] = (
    "shapes",
    "simple shapes",
    "geometric shapes",
    "basic shapes",
    "little figures",
    "simple icons",
)

_PERSONAL_EXTRAS: tuple[str, ...] = (
    "my favourite",
    "please",
    "for my notebook",
    "for my sticker collection",
    "just how I like it",
    "for my kids",
    "as always",
    "for my phone wallpaper",
    "every single time",
    "for our team",
)

if set(_TEMPLATES) != {PLAIN, *DEVICE_STYLES}:  # pragma: no cover - guards edits to the tables
    raise RuntimeError("every style needs task-description templates")


def personal_extra(rng: np.random.Generator) -> str:
    """A device's personal filler words, shared by all of its descriptions."""
    return _PERSONAL_EXTRAS[int(rng.integers(len(_PERSONAL_EXTRAS)))]


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
