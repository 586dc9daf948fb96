"""Batches of captioned samples: the plain pretraining set, per-style sets and held-out splits."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tessera.data.palette import COLOUR_NAMES
from tessera.data.shapes import SHAPES
from tessera.data.styles import (
    ATTRIBUTES,
    PLAIN,
    PRETRAINING_LOOKS,
    Look,
    Sample,
    Variation,
    check_subject,
    look_caption,
    render,
    render_sample,
)
from tessera.data.tensors import to_tensor

if TYPE_CHECKING:
    import torch

PRETRAINING_LOOK = "pretraining look"  # the style label of a sample drawn in a pretraining look


def rng_for(*keys: int | str) -> np.random.Generator:
    """A generator seeded by a tuple of keys; strings hash stably (crc32), unlike `hash()`."""
    entropy = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@dataclass(frozen=True)
class Batch:
    """Samples stacked for training: images NxHxWx3 uint8 plus one label tuple per field."""

    images: np.ndarray = field(repr=False)
    captions: tuple[str, ...]
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    styles: tuple[str, ...]

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> Batch:
        """Stack a sequence of samples (at least one)."""
        if not samples:
            raise ValueError("a batch needs at least one sample")
        return cls(
            images=np.stack([s.image for s in samples]),
            captions=tuple(s.caption for s in samples),
            shapes=tuple(s.shape for s in samples),
            colours=tuple(s.colour for s in samples),
            styles=tuple(s.style for s in samples),
        )

    @classmethod
    def concat(cls, batches: Sequence[Batch]) -> Batch:
        """One batch holding the samples of several, in order."""
        return cls(
            images=np.concatenate([b.images for b in batches]),
            captions=tuple(c for b in batches for c in b.captions),
            shapes=tuple(s for b in batches for s in b.shapes),
            colours=tuple(c for b in batches for c in b.colours),
            styles=tuple(s for b in batches for s in b.styles),
        )

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.captions)

    def __getitem__(self, index: int) -> Sample:
        """The sample at `index`."""
        return Sample(
            image=self.images[index],
            caption=self.captions[index],
            shape=self.shapes[index],
            colour=self.colours[index],
            style=self.styles[index],
        )

    def __iter__(self) -> Iterator[Sample]:
        """The samples in order."""
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """The samples at `indices`, in that order."""
        idx = [int(i) for i in indices]
        return Batch(
            images=self.images[idx],
            captions=tuple(self.captions[i] for i in idx),
            shapes=tuple(self.shapes[i] for i in idx),
            colours=tuple(self.colours[i] for i in idx),
            styles=tuple(self.styles[i] for i in idx),
        )

    def tensor(self) -> torch.Tensor:
        """The images as a float NCHW tensor in [-1, 1]."""
        return to_tensor(self.images)


def render_batch(
    subjects: Sequence[tuple[str, str]],
    style: str,
    rng: np.random.Generator,
    variation: Variation | None = None,
) -> Batch:
    """Render each (shape, colour) subject in `style`, drawing jitter from `rng`."""
    for shape, colour in subjects:
        check_subject(shape, colour, style)
    return Batch.from_samples(
        [render_sample(shape, colour, style, rng, variation) for shape, colour in subjects]
    )


def uniform_subjects(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`n` subjects drawn uniformly from every shape x colour pair."""
    shapes = rng.integers(len(SHAPES), size=n)
    colours = rng.integers(len(COLOUR_NAMES), size=n)
    return [(SHAPES[s], COLOUR_NAMES[c]) for s, c in zip(shapes, colours, strict=True)]


def cycled_subjects(n: int, seed: int, tag: str) -> list[tuple[str, str]]:
    """`n` (shape, colour) pairs cycling through every subject in an order seeded by
    (`tag`, `seed`): evaluation prompts that cover all subjects evenly."""
    pairs = [(s, c) for s in SHAPES for c in COLOUR_NAMES]
    order = rng_for(tag, seed).permutation(len(pairs))
    return [pairs[order[i % len(pairs)]] for i in range(n)]


def pretraining_batch(n: int, seed: int, *, look_share: float = 0.0) -> Batch:
    """`n` renderings of uniformly drawn subjects: the base model's pretraining data. Plain
    with plain captions, except a `look_share` of them drawn in one of `PRETRAINING_LOOKS`
    (never a style's own look) with a caption that names it."""
    if look_share <= 0.0:
        return style_dataset(PLAIN, n, seed)
    rng = rng_for("pretraining-looks", seed)
    samples = []
    for shape, colour in uniform_subjects(n, rng):
        if rng.random() >= look_share:
            samples.append(render_sample(shape, colour, PLAIN, rng))
            continue
        look = _pretraining_look(rng)
        image = render(shape, colour, look, rng)
        samples.append(
            Sample(image, look_caption(shape, colour, look), shape, colour, PRETRAINING_LOOK)
        )
    return Batch.from_samples(samples)


def _pretraining_look(rng: np.random.Generator) -> Look:
    """A look for pretraining: each attribute keeps its plain value half the time, else takes
    any other, so that looks changing one or two attributes are common and attributes vary
    independently; never a style's own look."""
    allowed = set(PRETRAINING_LOOKS)
    while True:
        values = {
            attribute: options[0] if rng.random() < 0.5 else str(rng.choice(options[1:]))
            for attribute, options in ATTRIBUTES.items()
        }
        look = Look(**values)
        if look in allowed:
            return look


def style_dataset(style: str, n: int, seed: int, variation: Variation | None = None) -> Batch:
    """`n` uniformly drawn subjects in one style (canonical look unless a variation is given)."""
    rng = rng_for("style-dataset", style, seed)
    return render_batch(uniform_subjects(n, rng), style, rng, variation)


def heldout_split(batch: Batch, fraction: float, seed: int) -> tuple[Batch, Batch]:
    """Shuffle `batch` and cut it into (train, held-out), the held-out part `fraction` of it."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    n_heldout = round(len(batch) * fraction)
    if not 0 < n_heldout < len(batch):
        raise ValueError(f"a {fraction} split of {len(batch)} samples leaves a side empty")
    order = rng_for("heldout-split", seed).permutation(len(batch))
    return batch.subset(order[n_heldout:]), batch.subset(order[:n_heldout])
