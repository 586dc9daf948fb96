"""Look and content classifier used as the evaluation metric of generated images.

It plays the role CLIP score and FID play for real models. One head per look attribute
(palette, texture, stroke, fill) and one each for the subject's shape and colour. A style is a
combination of attributes (`tessera.data.styles.LOOKS`), so the evaluator scores a pure style
(the style whose attributes are jointly most probable) and also a hybrid: the share of images
that carry the attributes of both of its styles at once, which no single-label classifier can say.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from tessera.data.tensors import to_tensor

DEFAULT_EVALUATOR_PATH = Path(__file__).resolve().parents[1] / "assets" / "evaluator"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

Images = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class EvaluatorConfig:
    """Label sets, the styles' looks and network widths: all that rebuilds the network."""

    attributes: dict[str, tuple[str, ...]]
    looks: dict[str, dict[str, str]]
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    widths: tuple[int, ...] = (16, 32, 64, 128)
    image_size: int = 32
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def styles(self) -> tuple[str, ...]:
        """Style names, in the order of the style probabilities."""
        return tuple(self.looks)

    def heads(self) -> dict[str, tuple[str, ...]]:
        """Every head's labels: the look attributes, then shape and colour."""
        return {**self.attributes, "shape": self.shapes, "colour": self.colours}

    def to_json(self) -> str:
        """The config as the JSON file shipped next to the weights."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EvaluatorConfig:
        """Parse the shipped JSON config."""
        raw = json.loads(text)
        return cls(
            attributes={name: tuple(labels) for name, labels in raw["attributes"].items()},
            looks={style: dict(values) for style, values in raw["looks"].items()},
            shapes=tuple(raw["shapes"]),
            colours=tuple(raw["colours"]),
            widths=tuple(raw["widths"]),
            image_size=int(raw["image_size"]),
            training=dict(raw.get("training", {})),
        )


class LookContentNet(nn.Module):
    """Small CNN with one shared trunk and a linear head per attribute, shape and colour."""

    def __init__(self, config: EvaluatorConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(config.widths):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(2 * channels, len(labels)) for name, labels in config.heads().items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head for NCHW images in [-1, 1]."""
        maps = self.trunk(images)
        pooled = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


@dataclass(frozen=True)
class HeadProbabilities:
    """Per-image class probabilities of every head, columns in the order of its labels."""

    heads: dict[str, np.ndarray]
    config: EvaluatorConfig

    def predicted(self, head: str) -> list[str]:
        """The most probable label of `head` for each image."""
        labels = self.config.heads()[head]
        return [labels[i] for i in self.heads[head].argmax(axis=1)]

    def predicted_shapes(self) -> list[str]:
        """The most probable shape of each image."""
        return self.predicted("shape")

    def predicted_colours(self) -> list[str]:
        """The most probable colour of each image."""
        return self.predicted("colour")

    def look_probability(self, look: dict[str, str]) -> np.ndarray:
        """Per image, the joint probability of a look: the product over its attributes."""
        joint = np.ones(next(iter(self.heads.values())).shape[0])
        for attribute, labels in self.config.attributes.items():
            joint = joint * self.heads[attribute][:, labels.index(look[attribute])]
        return joint

    @property
    def style(self) -> np.ndarray:
        """Per-image style probabilities [n, styles]: the looks' joint probabilities, normalised."""
        joint = np.stack([self.look_probability(look) for look in self.config.looks.values()], 1)
        return joint / np.maximum(joint.sum(axis=1, keepdims=True), 1e-12)

    def predicted_styles(self) -> list[str]:
        """The style of each image: the one whose attributes are jointly most probable."""
        styles = self.config.styles
        return [styles[i] for i in self.style.argmax(axis=1)]

    def carries(self, style: str) -> np.ndarray:
        """Per image, whether every attribute `style` changes from plain is the predicted one."""
        changed = _changes(self.config, style)
        ok = np.ones(next(iter(self.heads.values())).shape[0], dtype=bool)
        for attribute, value in changed.items():
            ok &= np.asarray(self.predicted(attribute), dtype=object) == value
        return ok


def _changes(config: EvaluatorConfig, style: str) -> dict[str, str]:
    """The attributes a style sets away from the first style's (plain) look."""
    if style not in config.looks:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(config.styles)}")
    plain = next(iter(config.looks.values()))
    return {a: v for a, v in config.looks[style].items() if v != plain[a]}


@dataclass(frozen=True)
class EvaluationScores:
    """How well a set of generated images matches a requested style and content."""

    n_images: int
    style: str | None
    style_share: float | None
    style_probability: float | None
    style_mix: dict[str, float]
    style_votes: dict[str, float]
    shape_accuracy: float | None = None
    colour_accuracy: float | None = None
    content_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, ready for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class HybridScores:
    """Whether images carry the attributes of two styles at once (a hybrid's measure)."""

    styles: tuple[str, str]
    n_images: int
    carries_first: float
    carries_second: float
    carries_both: float
    conflicting: tuple[str, ...]  # attributes the two styles set differently: "both" impossible

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, ready for JSON."""
        return asdict(self)


def _as_batch(images: Images) -> torch.Tensor:
    """uint8 HWC array(s) or float CHW tensor(s) in [-1, 1] to a float NCHW tensor."""
    if isinstance(images, torch.Tensor):
        tensor = images.detach().float().cpu()
        return tensor[None] if tensor.ndim == 3 else tensor
    return to_tensor(np.asarray(images))


def _subjects(
    content: tuple[str, str] | Sequence[tuple[str, str]], n: int
) -> list[tuple[str, str]]:
    """One (shape, colour) pair per image, from a single pair or a list of them."""
    if len(content) == 2 and all(isinstance(part, str) for part in content):
        shape, colour = content
        return [(str(shape), str(colour))] * n
    pairs = [(str(pair[0]), str(pair[1])) for pair in content]
    if len(pairs) != n:
        raise ValueError(f"got {len(pairs)} (shape, colour) pairs for {n} images")
    return pairs


def matches(predicted: Sequence[str], expected: Sequence[str]) -> np.ndarray:
    """Element-wise equality of predicted and expected labels, as a boolean array."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} expected labels")
    return np.asarray(predicted, dtype=object) == np.asarray(expected, dtype=object)


class Evaluator:
    """The trained classifier with its labels; predicts and scores batches of images."""

    def __init__(self, network: LookContentNet, config: EvaluatorConfig) -> None:
        self.network = network.eval()
        self.config = config

    @property
    def styles(self) -> tuple[str, ...]:
        """Style labels, in the order of the style probabilities."""
        return self.config.styles

    @torch.inference_mode()
    def predict(self, images: Images, batch_size: int = 512) -> HeadProbabilities:
        """Class probabilities per head for uint8 NxHxWx3 arrays or float NCHW tensors."""
        batch = _as_batch(images)
        size = self.config.image_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise ValueError(f"expected images of 3x{size}x{size}, got {tuple(batch.shape)}")
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in self.config.heads()}
        for start in range(0, batch.shape[0], batch_size):
            for name, logits in self.network(batch[start : start + batch_size]).items():
                outputs[name].append(logits.softmax(dim=1).numpy())
        return HeadProbabilities(
            heads={name: np.concatenate(parts) for name, parts in outputs.items()},
            config=self.config,
        )

    def evaluate(
        self,
        images: Images,
        *,
        style: str | None = None,
        content: tuple[str, str] | Sequence[tuple[str, str]] | None = None,
    ) -> EvaluationScores:
        """Score images against a requested style and, optionally, (shape, colour) content."""
        if style is not None and style not in self.styles:
            raise ValueError(f"unknown style {style!r}; expected one of {', '.join(self.styles)}")
        probs = self.predict(images)
        style_probs = probs.style
        n = style_probs.shape[0]
        votes = np.bincount(style_probs.argmax(axis=1), minlength=len(self.styles)) / n
        mix = style_probs.mean(axis=0)
        scores = EvaluationScores(
            n_images=n,
            style=style,
            style_share=None if style is None else float(votes[self.styles.index(style)]),
            style_probability=None if style is None else float(mix[self.styles.index(style)]),
            style_mix={s: float(p) for s, p in zip(self.styles, mix, strict=True)},
            style_votes={s: float(v) for s, v in zip(self.styles, votes, strict=True)},
        )
        if content is None:
            return scores
        subjects = _subjects(content, n)
        shape_ok = matches(probs.predicted_shapes(), [shape for shape, _ in subjects])
        colour_ok = matches(probs.predicted_colours(), [colour for _, colour in subjects])
        return EvaluationScores(
            **{
                **asdict(scores),
                "shape_accuracy": float(shape_ok.mean()),
                "colour_accuracy": float(colour_ok.mean()),
                "content_accuracy": float((shape_ok & colour_ok).mean()),
            }
        )

    def hybrid(self, images: Images, styles: tuple[str, str]) -> HybridScores:
        """The share of images carrying the first style's attributes, the second's, and both."""
        first, second = styles
        a, b = _changes(self.config, first), _changes(self.config, second)
        probs = self.predict(images)
        carries_a, carries_b = probs.carries(first), probs.carries(second)
        return HybridScores(
            styles=(first, second),
            n_images=int(carries_a.shape[0]),
            carries_first=float(carries_a.mean()),
            carries_second=float(carries_b.mean()),
            carries_both=float((carries_a & carries_b).mean()),
            conflicting=tuple(sorted(k for k in a.keys() & b.keys() if a[k] != b[k])),
        )


def load_evaluator(path: Path | str | None = None) -> Evaluator:
    """Load the classifier from a folder holding model.safetensors and config.json."""
    folder = Path(path) if path is not None else DEFAULT_EVALUATOR_PATH
    weights, config_file = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for required in (weights, config_file):
        if not required.is_file():
            raise FileNotFoundError(
                f"evaluator file {required} is missing; train it with "
                "`python -m tessera.data.train_evaluator`"
            )
    config = EvaluatorConfig.from_json(config_file.read_text())
    network = LookContentNet(config)
    network.load_state_dict(load_file(str(weights)))
    return Evaluator(network, config)


@cache
def default_evaluator() -> Evaluator:
    """The shipped evaluator, loaded once per process on first use."""
    return load_evaluator()


def evaluate(
    images: Images,
    *,
    style: str | None = None,
    content: tuple[str, str] | Sequence[tuple[str, str]] | None = None,
    evaluator: Evaluator | None = None,
) -> EvaluationScores:
    """Score images with the shipped evaluator (or the one given); see `Evaluator.evaluate`."""
    return (evaluator or default_evaluator()).evaluate(images, style=style, content=content)
