"""uint8 images and [-1, 1] tensors convert both ways without loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.data import pretraining_batch, to_tensor, to_uint8


def test_round_trip_is_lossless():
    images = pretraining_batch(8, 0).images

    tensor = to_tensor(images)

    assert tensor.shape == (8, 3, 32, 32)
    assert tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    np.testing.assert_array_equal(to_uint8(tensor), images)


def test_single_images_are_batched():
    image = pretraining_batch(1, 0).images[0]

    assert to_tensor(image).shape == (1, 3, 32, 32)


def test_float_arrays_are_refused():
    with pytest.raises(ValueError, match="expected uint8"):
        to_tensor(np.zeros((2, 32, 32, 3), dtype=np.float32))
