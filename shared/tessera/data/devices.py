"""Simulated edge devices: one style each, with a personal variation, subjects and descriptions.

Devices of one style are alike (same ground-truth cluster) but not identical: each has its own
small hue shift, jitter strength, pattern geometry, preferred subjects and way of describing its
task, as real users who share a taste would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tessera.data.datasets import Batch, render_batch, rng_for, uniform_subjects
from tessera.data.descriptions import personal_extra, task_descriptions
from tessera.data.palette import COLOUR_NAMES
from tessera.data.shapes import SHAPES
from tessera.data.styles import DEVICE_STYLES, STYLES, Variation

_SAMPLES_STREAM = 0
_HELDOUT_STREAM = 1


def random_variation(rng: np.random.Generator) -> Variation:
    """A personal variation small enough to keep the style recognisable."""
    tint = rng.uniform(-0.03, 0.03, size=3)
    return Variation(
        hue_shift=float(rng.uniform(-0.012, 0.012)),
        jitter=float(rng.uniform(0.6, 1.2)),
        pattern_scale=float(rng.uniform(0.85, 1.2)),
        pattern_angle=float(rng.uniform(-12.0, 12.0)),
        pattern_phase=(float(rng.uniform(0.0, 16.0)), float(rng.uniform(0.0, 16.0))),
        background_tint=(float(tint[0]), float(tint[1]), float(tint[2])),
    )


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated device: its style, personal variation, favourite subjects and descriptions."""

    device_id: str
    style: str
    index: int
    seed: int
    variation: Variation
    preferred_shapes: tuple[str, ...]
    preferred_colours: tuple[str, ...]
    preference: float
    descriptions: tuple[str, ...]

    def _subjects(self, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        """Mostly preferred subjects, the rest drawn uniformly from all of them."""
        uniform = uniform_subjects(n, rng)
        shapes = rng.choice(self.preferred_shapes, size=n)
        colours = rng.choice(self.preferred_colours, size=n)
        favourite = rng.random(n) < self.preference
        return [(str(shapes[i]), str(colours[i])) if favourite[i] else uniform[i] for i in range(n)]

    def _batch(self, stream: int, n: int, seed: int) -> Batch:
        """`n` samples from one of the device's independent random streams."""
        rng = rng_for("device-samples", self.style, self.index, self.seed, stream, seed)
        return render_batch(self._subjects(n, rng), self.style, rng, self.variation)

    def samples(self, n: int, seed: int = 0) -> Batch:
        """The device's local training data: `n` samples, identical for the same seed."""
        return self._batch(_SAMPLES_STREAM, n, seed)

    def heldout(self, n: int, seed: int = 0) -> Batch:
        """Held-out data from the device's distribution, drawn apart from any `samples` call."""
        return self._batch(_HELDOUT_STREAM, n, seed)


def make_device(style: str, device_index: int, seed: int = 0) -> DeviceProfile:
    """The `device_index`-th device of `style` in a population built from `seed`."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if device_index < 0:
        raise ValueError(f"device_index must be >= 0, got {device_index}")
    rng = rng_for("device-profile", style, device_index, seed)
    shapes = rng.choice(SHAPES, size=int(rng.integers(2, 4)), replace=False)
    colours = rng.choice(COLOUR_NAMES, size=int(rng.integers(2, 5)), replace=False)
    variation = random_variation(rng)
    extra = personal_extra(rng)
    descriptions = task_descriptions(style, int(rng.integers(3, 6)), rng, extra=extra)
    return DeviceProfile(
        device_id=f"{style}-{device_index:03d}",
        style=style,
        index=device_index,
        seed=seed,
        variation=variation,
        preferred_shapes=tuple(str(s) for s in shapes),
        preferred_colours=tuple(str(c) for c in colours),
        preference=float(rng.uniform(0.6, 0.9)),
        descriptions=descriptions,
    )


def make_population(devices_per_style: int, seed: int = 0) -> list[DeviceProfile]:
    """`devices_per_style` devices for every device style (plain excluded), style by style."""
    return [
        make_device(style, i, seed) for style in DEVICE_STYLES for i in range(devices_per_style)
    ]
