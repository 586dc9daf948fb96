"""Synthetic style dataset (captioned shapes in distinct styles) and simulated device profiles.

The evaluation classifier lives in `tessera.data.evaluator`; it is not imported here, so that
importing the dataset stays cheap (no torch).
"""

from tessera.data.datasets import (
    Batch,
    cycled_subjects,
    heldout_split,
    pretraining_batch,
    render_batch,
    rng_for,
    style_dataset,
    uniform_subjects,
)
from tessera.data.descriptions import task_descriptions
from tessera.data.devices import DeviceProfile, make_device, make_population, random_variation
from tessera.data.palette import COLOUR_NAMES
from tessera.data.shapes import SHAPES
from tessera.data.styles import (
    ATTRIBUTES,
    DEVICE_STYLES,
    IMAGE_SIZE,
    LOOKS,
    PLAIN,
    STYLES,
    Look,
    Sample,
    Variation,
    caption,
    render,
    render_sample,
)
from tessera.data.tensors import to_tensor, to_uint8

__all__ = [
    "ATTRIBUTES",
    "COLOUR_NAMES",
    "DEVICE_STYLES",
    "IMAGE_SIZE",
    "LOOKS",
    "PLAIN",
    "SHAPES",
    "STYLES",
    "Batch",
    "DeviceProfile",
    "Look",
    "Sample",
    "Variation",
    "caption",
    "cycled_subjects",
    "heldout_split",
    "make_device",
    "make_population",
    "pretraining_batch",
    "random_variation",
    "render",
    "render_batch",
    "render_sample",
    "rng_for",
    "style_dataset",
    "task_descriptions",
    "to_tensor",
    "to_uint8",
    "uniform_subjects",
]
