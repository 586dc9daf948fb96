"""The renderer: determinism, captions, and every device style a clear change from plain."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.data import (
    ATTRIBUTES,
    COLOUR_NAMES,
    DEVICE_STYLES,
    IMAGE_SIZE,
    LOOKS,
    PLAIN,
    SHAPES,
    STYLES,
    Look,
    caption,
    pretraining_batch,
    render,
    render_sample,
    style_dataset,
)
from tessera.data.datasets import PRETRAINING_LOOK
from tessera.data.styles import PRETRAINING_LOOKS, look_caption


def test_render_gives_identical_bytes_for_the_same_seed():
    first = [render(shape, "red", style, 7) for shape in SHAPES for style in STYLES]

    second = [render(shape, "red", style, 7) for shape in SHAPES for style in STYLES]

    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second, strict=True))


def test_render_differs_across_seeds():
    images = {render("star", "blue", PLAIN, seed).tobytes() for seed in range(20)}

    assert len(images) == 20


def test_batches_are_deterministic_per_seed():
    first, second, other = (
        pretraining_batch(64, 3),
        pretraining_batch(64, 3),
        pretraining_batch(64, 4),
    )

    assert first.images.tobytes() == second.images.tobytes()
    assert first.captions == second.captions
    assert first.images.tobytes() != other.images.tobytes()


def test_images_are_uint8_rgb_of_the_canvas_size():
    batch = style_dataset("night", 10, 0)

    assert batch.images.shape == (10, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch.images.dtype == np.uint8


@pytest.mark.parametrize(
    ("shape", "colour", "expected"),
    [("circle", "red", "a red circle"), ("square", "orange", "an orange square")],
)
def test_caption_names_the_subject_with_the_right_article(shape, colour, expected):
    assert caption(shape, colour) == expected


def test_samples_carry_the_caption_of_their_subject_and_never_the_style():
    batch = style_dataset("stripes", 200, 1)

    for sample in batch:
        assert sample.caption == caption(sample.shape, sample.colour)
        assert sample.style == "stripes"
        assert "stripe" not in sample.caption


def test_pretraining_data_is_plain_and_covers_every_subject():
    batch = pretraining_batch(600, 0)

    assert set(batch.styles) == {PLAIN}
    assert {(s.shape, s.colour) for s in batch} == {(s, c) for s in SHAPES for c in COLOUR_NAMES}


@pytest.mark.parametrize("style", DEVICE_STYLES)
def test_every_device_style_is_visibly_different_from_plain(style):
    subjects = [(shape, colour) for shape in SHAPES for colour in COLOUR_NAMES]

    differences = [
        np.abs(
            render(shape, colour, style, seed).astype(float)
            - render(shape, colour, PLAIN, seed).astype(float)
        ).mean()
        / 255.0
        for seed, (shape, colour) in enumerate(subjects)
    ]

    assert min(differences) > 0.05


def test_the_subject_stays_where_the_seed_puts_it_whatever_the_style():
    masks = []
    for style in STYLES:
        image = render("square", "blue", style, 11).astype(float)
        masks.append(image[..., 2] - image[..., 0] > 60)

    overlaps = [(masks[0] & mask).sum() / masks[0].sum() for mask in masks[1:]]

    assert min(overlaps) > 0.6


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="expected one of plain, stripes"):
        render("circle", "red", "watercolour", 0)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        render_sample("hexagon", "red", PLAIN, 0)


def test_every_style_is_a_distinct_combination_of_attributes():
    looks = [LOOKS[style] for style in STYLES]

    assert len(set(looks)) == len(STYLES)
    assert LOOKS[PLAIN].changes() == {}
    assert all(LOOKS[style].changes() for style in DEVICE_STYLES)


def test_two_looks_combine_where_they_change_different_attributes():
    both = LOOKS["pastel"].combined(LOOKS["outline"])

    assert both == Look(palette="lavender", fill="pale", stroke="outline")
    assert LOOKS["outline"].combined(LOOKS["pastel"]) == both
    assert LOOKS["stripes"].combined(LOOKS["checker"]) is None  # two textures
    assert LOOKS["night"].combined(LOOKS["outline"]) is None  # glow and outline are strokes


def test_a_combined_look_renders_each_part_where_the_style_alone_does():
    seed, look = 7, LOOKS["night"].combined(LOOKS["stripes"])
    assert look is not None
    night = render("square", "green", "night", seed).astype(int)
    stripes = render("square", "green", "stripes", seed).astype(int)
    both = render("square", "green", look, seed).astype(int)

    corner = (slice(0, 4), slice(0, 4))  # background only: the subject stays in the middle
    assert both[corner].mean() < 0.5 * stripes[corner].mean()  # navy ground...
    assert both[corner].std() > 3 * night[corner].std()  # ...with the stripes' bands


def test_an_unknown_attribute_value_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown texture 'tartan'; expected one of none"):
        Look(texture="tartan")


def test_pretraining_looks_are_every_combination_but_the_styles_own():
    looks = set(PRETRAINING_LOOKS)
    combinations = np.prod([len(values) for values in ATTRIBUTES.values()])

    assert len(looks) == len(PRETRAINING_LOOKS) == combinations - len(STYLES)
    assert not looks & set(LOOKS.values())
    for attribute, values in ATTRIBUTES.items():  # the base sees every value of every attribute
        assert {look.values()[attribute] for look in looks} == set(values)


def test_a_pretraining_look_is_captioned_with_what_changes_and_plain_stays_plain():
    batch = pretraining_batch(400, 5, look_share=0.5)

    looks = [i for i, style in enumerate(batch.styles) if style == PRETRAINING_LOOK]
    assert 150 < len(looks) < 250
    assert set(batch.styles) == {PLAIN, PRETRAINING_LOOK}
    for i, text in enumerate(batch.captions):
        subject = caption(batch.shapes[i], batch.colours[i])
        if i in looks:
            assert text.startswith(subject + ", ") and len(text) > len(subject) + 2
        else:
            assert text == subject
    assert look_caption("star", "red", Look(palette="navy", stroke="glow")) == (
        "a red star, on navy, glowing"
    )
