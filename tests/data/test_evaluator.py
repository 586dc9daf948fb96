"""The shipped evaluator: held-out accuracy, robustness to blur and noise, and its scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessera.data import (
    ATTRIBUTES,
    DEVICE_STYLES,
    LOOKS,
    PLAIN,
    STYLES,
    Batch,
    make_device,
    render,
    style_dataset,
)
from tessera.data.augment import add_noise, gaussian_blur
from tessera.data.evaluator import DEFAULT_EVALUATOR_PATH, load_evaluator, matches
from tessera.data.tensors import to_tensor
from tessera.data.train_evaluator import combined_looks


@pytest.fixture(scope="module")
def heldout() -> Batch:
    """300 images never seen in training: unseen devices' data for every style, plain included."""
    per_style = 300 // len(STYLES)
    batches = [style_dataset(PLAIN, per_style, seed=424242)] + [
        make_device(style, 100 + i, seed=424242).heldout(per_style // 2)
        for style in DEVICE_STYLES
        for i in range(2)
    ]
    return Batch.concat(batches)


def accuracies(evaluator, images, batch: Batch) -> dict[str, float]:
    probs = evaluator.predict(images)
    return {
        "style": matches(probs.predicted_styles(), batch.styles).mean(),
        "shape": matches(probs.predicted_shapes(), batch.shapes).mean(),
        "colour": matches(probs.predicted_colours(), batch.colours).mean(),
    }


def test_heldout_accuracy(evaluator, heldout):
    scores = accuracies(evaluator, heldout.images, heldout)

    assert scores["style"] >= 0.95
    assert scores["shape"] >= 0.95
    assert scores["colour"] >= 0.95


@pytest.mark.parametrize(
    "degradation",
    [
        pytest.param(lambda x: gaussian_blur(x, 0.8), id="blur"),
        pytest.param(
            lambda x: add_noise(x, 0.08, torch.Generator().manual_seed(0)).clamp(-1, 1), id="noise"
        ),
        pytest.param(
            lambda x: F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear"),
            id="half-resolution",
        ),
    ],
)
def test_heldout_accuracy_survives_mild_degradation(evaluator, heldout, degradation):
    images = degradation(to_tensor(heldout.images))

    scores = accuracies(evaluator, images, heldout)

    assert scores["style"] >= 0.95
    assert scores["shape"] >= 0.9
    assert scores["colour"] >= 0.9


def test_uint8_arrays_and_float_tensors_score_alike(evaluator, heldout):
    from_array = evaluator.predict(heldout.images[:32])
    from_tensor = evaluator.predict(to_tensor(heldout.images[:32]))

    np.testing.assert_allclose(from_array.style, from_tensor.style, atol=1e-5)


def test_evaluate_scores_a_requested_style_and_content(evaluator):
    images = np.stack([render("star", "orange", "night", seed) for seed in range(40)])

    scores = evaluator.evaluate(images, style="night", content=("star", "orange"))

    assert scores.n_images == 40
    assert scores.style_share == pytest.approx(1.0)
    assert scores.style_probability > 0.9
    assert set(scores.style_mix) == set(STYLES)
    assert sum(scores.style_mix.values()) == pytest.approx(1.0)
    assert scores.shape_accuracy == scores.colour_accuracy == scores.content_accuracy == 1.0


def test_evaluate_takes_one_subject_per_image(evaluator):
    subjects = [("circle", "red"), ("square", "blue")]
    images = np.stack([render(shape, colour, PLAIN, 0) for shape, colour in subjects])

    right = evaluator.evaluate(images, style=PLAIN, content=subjects)
    swapped = evaluator.evaluate(images, style=PLAIN, content=subjects[::-1])

    assert right.content_accuracy == 1.0
    assert swapped.shape_accuracy == swapped.colour_accuracy == 0.0


def test_wrong_style_scores_low(evaluator):
    images = style_dataset("pastel", 40, 0).images

    scores = evaluator.evaluate(images, style="stripes")

    assert scores.style_share == 0.0
    assert scores.style_votes["pastel"] == 1.0


def test_every_attribute_head_reads_combined_looks_it_was_not_shown_as_styles(evaluator):
    images, labels = combined_looks(300, seed=424242)

    probs = evaluator.predict(images)

    for attribute in ATTRIBUTES:
        assert matches(probs.predicted(attribute), labels[attribute]).mean() >= 0.95, attribute


@pytest.mark.parametrize(("first", "second"), [("pastel", "outline"), ("night", "stripes")])
def test_a_combined_rendering_carries_both_styles_and_each_style_only_itself(
    evaluator, first, second
):
    look = LOOKS[first].combined(LOOKS[second])
    assert look is not None
    both = np.stack([render("star", "blue", look, seed) for seed in range(40)])
    alone = np.stack([render("star", "blue", first, seed) for seed in range(40)])

    hybrid = evaluator.hybrid(both, (first, second))
    single = evaluator.hybrid(alone, (first, second))

    assert hybrid.carries_both >= 0.95
    assert hybrid.conflicting == ()
    assert single.carries_first >= 0.95
    assert single.carries_second == single.carries_both == 0.0


def test_styles_that_set_one_attribute_differently_are_reported_as_conflicting(evaluator):
    images = style_dataset("dots", 8, 0).images

    scores = evaluator.hybrid(images, ("dots", "night"))

    assert scores.conflicting == ("palette",)
    assert scores.carries_both == 0.0


def test_unknown_style_and_missing_weights_are_explained(evaluator, tmp_path):
    with pytest.raises(ValueError, match="unknown style 'cubist'"):
        evaluator.evaluate(style_dataset(PLAIN, 2, 0).images, style="cubist")
    with pytest.raises(FileNotFoundError, match="train_evaluator"):
        load_evaluator(tmp_path)


def test_shipped_weights_stay_small():
    size = sum(f.stat().st_size for f in DEFAULT_EVALUATOR_PATH.iterdir())

    assert size < 2_000_000
