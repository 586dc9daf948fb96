"""Train the look/content evaluator on freshly rendered synthetic data and ship its weights.

Half of every batch is the styles' own looks; the other half draws each attribute
independently, so the heads learn attributes, not styles, and recognise combined renderings
(a hybrid's target look) they would otherwise never see.

Run `python -m tessera.data.train_evaluator`; it writes model.safetensors and config.json to
shared/tessera/assets/evaluator/ and prints the held-out accuracy table for docs/evaluator.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tessera.data.augment import degrade
from tessera.data.datasets import Batch, rng_for, style_dataset, uniform_subjects
from tessera.data.devices import make_device, random_variation
from tessera.data.evaluator import (
    CONFIG_FILE,
    DEFAULT_EVALUATOR_PATH,
    WEIGHTS_FILE,
    Evaluator,
    EvaluatorConfig,
    LookContentNet,
    matches,
)
from tessera.data.palette import COLOUR_NAMES
from tessera.data.shapes import SHAPES
from tessera.data.styles import ATTRIBUTES, DEVICE_STYLES, LOOKS, STYLES, Look, render
from tessera.data.tensors import to_tensor


@dataclass(frozen=True)
class TrainingPlan:
    """How the evaluator is trained; stored in its config for reproducibility."""

    steps: int = 800
    batch_size: int = 128
    learning_rate: float = 4e-3
    weight_decay: float = 1e-4
    combined_share: float = 0.5
    variation_share: float = 0.75
    seed: int = 0
    threads: int = 1


@dataclass(frozen=True)
class TrainingBatch:
    """Degraded images with each head's target label indices."""

    images: torch.Tensor
    targets: dict[str, torch.Tensor]


def random_look(rng: np.random.Generator) -> Look:
    """Any combination of attribute values, each drawn uniformly."""
    return Look(**{a: str(rng.choice(values)) for a, values in ATTRIBUTES.items()})


def training_batch(
    plan: TrainingPlan, rng: np.random.Generator, gen: torch.Generator
) -> TrainingBatch:
    """Render a fresh batch: the styles' looks and random combinations of attributes."""
    n = plan.batch_size
    subjects = uniform_subjects(n, rng)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    labels: dict[str, list[int]] = {head: [] for head in (*ATTRIBUTES, "shape", "colour")}
    for i, (shape, colour) in enumerate(subjects):
        combined = rng.random() < plan.combined_share
        look = random_look(rng) if combined else LOOKS[STYLES[int(rng.integers(len(STYLES)))]]
        variation = random_variation(rng) if rng.random() < plan.variation_share else None
        images[i] = render(shape, colour, look, int(rng.integers(2**62)), variation)
        for attribute, value in look.values().items():
            labels[attribute].append(ATTRIBUTES[attribute].index(value))
        labels["shape"].append(SHAPES.index(shape))
        labels["colour"].append(COLOUR_NAMES.index(colour))
    return TrainingBatch(
        images=degrade(to_tensor(images), gen),
        targets={head: torch.tensor(values) for head, values in labels.items()},
    )


def train(plan: TrainingPlan, *, log_every: int = 100) -> Evaluator:
    """Train a fresh network following `plan` and return it as an evaluator."""
    torch.manual_seed(plan.seed)
    config = EvaluatorConfig(
        attributes=dict(ATTRIBUTES),
        looks={style: look.values() for style, look in LOOKS.items()},
        shapes=SHAPES,
        colours=COLOUR_NAMES,
    )
    network = LookContentNet(config)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=plan.learning_rate, total_steps=plan.steps, pct_start=0.15
    )
    rng = rng_for("evaluator-training", plan.seed)
    gen = torch.Generator().manual_seed(plan.seed)
    network.train()
    for step in range(1, plan.steps + 1):
        batch = training_batch(plan, rng, gen)
        logits = network(batch.images)
        loss = sum(
            (F.cross_entropy(logits[head], target) for head, target in batch.targets.items()),
            start=torch.zeros(()),
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"step {step}/{plan.steps} loss {loss.item():.4f}", flush=True)
    return Evaluator(network.eval(), config)


Labels = dict[str, list[str]]


def _style_labels(batch: Batch) -> Labels:
    """A batch of pure styles' labels: the style, its look's attributes, shape and colour."""
    labels: Labels = {"style": list(batch.styles), "shape": list(batch.shapes)}
    labels["colour"] = list(batch.colours)
    for attribute in ATTRIBUTES:
        labels[attribute] = [LOOKS[style].values()[attribute] for style in batch.styles]
    return labels


def combined_looks(n: int, seed: int) -> tuple[np.ndarray, Labels]:
    """`n` renderings of random attribute combinations (most of them no style's look)."""
    rng = rng_for("evaluator-combined", seed)
    images: list[np.ndarray] = []
    labels: Labels = {head: [] for head in (*ATTRIBUTES, "shape", "colour")}
    for shape, colour in uniform_subjects(n, rng):
        look = random_look(rng)
        images.append(render(shape, colour, look, int(rng.integers(2**62)), random_variation(rng)))
        for attribute, value in look.values().items():
            labels[attribute].append(value)
        labels["shape"].append(shape)
        labels["colour"].append(colour)
    return np.stack(images), labels


def heldout_sets(seed: int, per_style: int) -> dict[str, tuple[np.ndarray, Labels]]:
    """Held-out data never seen in training: canonical renderings, unseen devices' data and
    random combinations of attributes, each with its labels."""
    canonical = Batch.concat(
        [style_dataset(style, per_style, seed=10_000 + seed) for style in STYLES]
    )
    devices = Batch.concat(
        [
            make_device(style, index, seed=10_000 + seed).heldout(per_style // 4)
            for style in DEVICE_STYLES
            for index in range(4)
        ]
    )
    return {
        "canonical": (canonical.images, _style_labels(canonical)),
        "unseen devices": (devices.images, _style_labels(devices)),
        "combined looks": combined_looks(per_style * 4, seed=10_000 + seed),
    }


REPORTED = ("style", *ATTRIBUTES, "shape", "colour")


def accuracy(evaluator: Evaluator, images: torch.Tensor, labels: Labels) -> dict[str, float]:
    """Accuracy of each labelled head (and of the derived style, where styles are labelled)."""
    probs = evaluator.predict(images)
    return {
        head: float(
            matches(
                probs.predicted_styles() if head == "style" else probs.predicted(head),
                labels[head],
            ).mean()
        )
        for head in REPORTED
        if head in labels
    }


def heldout_report(evaluator: Evaluator, *, seed: int = 0, per_style: int = 200) -> dict[str, Any]:
    """Accuracy per head on held-out sets: clean, degraded as in training, and degraded harder."""
    report: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(10_000 + seed)
    for name, (images, labels) in heldout_sets(seed, per_style).items():
        clean = to_tensor(images)
        n = {"n": len(images)}
        report[f"{name}, clean"] = accuracy(evaluator, clean, labels) | n
        report[f"{name}, degraded"] = accuracy(evaluator, degrade(clean, gen), labels) | n
        harsh = degrade(clean, gen, max_blur=1.8, max_noise=0.4, colour_strength=0.12)
        report[f"{name}, harsher than training"] = accuracy(evaluator, harsh, labels) | n
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The held-out report as a markdown table (a dash where a set has no such label)."""
    lines = [
        f"| held-out set | images | {' | '.join(REPORTED)} |",
        "|---|---|" + "---|" * len(REPORTED),
    ]
    for name, row in report.items():
        cells = " | ".join(f"{row[h]:.3f}" if h in row else "-" for h in REPORTED)
        lines.append(f"| {name} | {row['n']} | {cells} |")
    return "\n".join(lines)


def save_evaluator(evaluator: Evaluator, folder: Path) -> None:
    """Write the weights (safetensors) and config (JSON) that `load_evaluator` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in evaluator.network.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "tessera-evaluator"})
    (folder / CONFIG_FILE).write_text(evaluator.config.to_json())


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train, measure on held-out data, save next to the package's assets."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_EVALUATOR_PATH)
    parser.add_argument("--steps", type=int, default=TrainingPlan.steps)
    parser.add_argument("--batch-size", type=int, default=TrainingPlan.batch_size)
    parser.add_argument("--seed", type=int, default=TrainingPlan.seed)
    parser.add_argument("--threads", type=int, default=TrainingPlan.threads)
    args = parser.parse_args(argv)
    plan = TrainingPlan(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads
    )
    torch.set_num_threads(plan.threads)
    started = time.perf_counter()
    evaluator = train(plan)
    seconds = time.perf_counter() - started
    report = heldout_report(evaluator, seed=plan.seed)
    training = {"plan": plan.__dict__, "seconds": round(seconds, 1), "heldout": report}
    evaluator = Evaluator(evaluator.network, replace(evaluator.config, training=training))
    save_evaluator(evaluator, args.out)
    print(f"trained in {seconds:.0f} s on {plan.threads} thread(s); saved to {args.out}")
    print(markdown_table(report))
    print(json.dumps(training["plan"]))


if __name__ == "__main__":
    main()
