"""Device profiles: deterministic, alike within a style, never identical, with held-out data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tessera.data import DEVICE_STYLES, Batch, heldout_split, make_device, style_dataset


def colour_histogram(batch: Batch) -> np.ndarray:
    """Normalised 64-bin colour histogram of a batch: a layout-free summary of its look."""
    levels = (batch.images // 64).astype(int)
    bins = levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]
    counts = np.bincount(bins.ravel(), minlength=64).astype(float)
    return counts / counts.sum()


def test_a_device_is_rebuilt_identically_from_its_seed():
    first, second = make_device("dots", 2, seed=5), make_device("dots", 2, seed=5)

    assert first == second
    assert first.samples(32, seed=1).images.tobytes() == second.samples(32, seed=1).images.tobytes()


def test_devices_of_a_style_are_not_identical():
    devices = [make_device("stripes", index, seed=0) for index in range(4)]

    variations = {device.variation for device in devices}
    datasets = {device.samples(16).images.tobytes() for device in devices}

    assert len(variations) == 4
    assert len(datasets) == 4
    assert len({device.device_id for device in devices}) == 4


@pytest.fixture(scope="module")
def device_histograms() -> dict[tuple[str, int], np.ndarray]:
    """Colour histogram of 200 samples of four devices per style."""
    return {
        (style, index): colour_histogram(make_device(style, index, seed=0).samples(200))
        for style in DEVICE_STYLES
        for index in range(4)
    }


@pytest.mark.parametrize("style", DEVICE_STYLES)
def test_devices_of_a_style_look_closer_to_each_other_than_to_other_styles(
    device_histograms, style
):
    own = [device_histograms[(style, i)] for i in range(4)]
    others = [h for (s, _), h in device_histograms.items() if s != style]

    within = max(np.abs(a - b).sum() for a, b in itertools.combinations(own, 2))
    between = min(np.abs(a - b).sum() for a in own for b in others)

    assert within < between


def test_device_data_favours_its_preferred_subjects():
    device = make_device("pastel", 0, seed=0)

    batch = device.samples(400)
    favourite = np.mean(
        [s.shape in device.preferred_shapes and s.colour in device.preferred_colours for s in batch]
    )

    assert set(batch.styles) == {"pastel"}
    assert favourite >= device.preference - 0.05


def test_heldout_data_is_drawn_apart_from_training_data():
    device = make_device("checker", 1, seed=0)

    train = {image.tobytes() for image in device.samples(100).images}
    heldout = {image.tobytes() for image in device.heldout(100).images}

    assert train.isdisjoint(heldout)
    assert device.heldout(20).images.tobytes() == device.heldout(20).images.tobytes()


def test_heldout_split_partitions_a_batch():
    batch = style_dataset("gradient", 50, 0)

    train, heldout = heldout_split(batch, 0.2, seed=0)

    assert (len(train), len(heldout)) == (40, 10)
    rows = {image.tobytes() for image in batch.images}
    split_rows = [image.tobytes() for image in np.concatenate([train.images, heldout.images])]
    assert sorted(split_rows) == sorted(rows)


def test_each_device_describes_its_task_in_three_to_five_distinct_ways():
    devices = [make_device(style, i, seed=0) for style in DEVICE_STYLES for i in range(4)]

    for device in devices:
        assert 3 <= len(device.descriptions) <= 5
        assert len(set(device.descriptions)) == len(device.descriptions)
