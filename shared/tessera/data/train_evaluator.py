"""Train the style/content evaluator on freshly rendered synthetic data and ship its weights.

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
    StyleContentNet,
    matches,
)
from tessera.data.palette import COLOUR_NAMES
from tessera.data.shapes import SHAPES
from tessera.data.styles import DEVICE_STYLES, STYLES, render
from tessera.data.tensors import to_tensor


@dataclass(frozen=True)
class TrainingPlan:
    """How the evaluator is trained; stored in its config for reproducibility."""

    steps: int = 800
    batch_size: int = 128
    learning_rate: float = 4e-3
    weight_decay: float = 1e-4
    mixup_share: float = 0.15
    variation_share: float = 0.75
    seed: int = 0
    threads: int = 1


@dataclass(frozen=True)
class TrainingBatch:
    """Degraded images with their targets: soft style distributions, shape and colour indices."""

    images: torch.Tensor
    style_targets: torch.Tensor
    shapes: torch.Tensor
    colours: torch.Tensor


def training_batch(
    plan: TrainingPlan, rng: np.random.Generator, gen: torch.Generator
) -> TrainingBatch:
    """Render a fresh batch over all styles, some of it pixel blends of two styles (hybrids)."""
    n = plan.batch_size
    subjects = uniform_subjects(n, rng)
    first = rng.integers(len(STYLES), size=n)
    second = (first + rng.integers(1, len(STYLES), size=n)) % len(STYLES)
    blend = np.where(rng.random(n) < plan.mixup_share, rng.uniform(0.2, 0.8, size=n), 0.0)
    images = np.empty((n, 32, 32, 3), dtype=np.float64)
    targets = np.zeros((n, len(STYLES)), dtype=np.float32)
    for i, (shape, colour) in enumerate(subjects):
        variation = random_variation(rng) if rng.random() < plan.variation_share else None
        seed = int(rng.integers(2**62))
        images[i] = render(shape, colour, STYLES[first[i]], seed, variation)
        targets[i, first[i]] = 1.0 - blend[i]
        if blend[i] > 0.0:
            other = render(shape, colour, STYLES[second[i]], seed, variation)
            images[i] = (1.0 - blend[i]) * images[i] + blend[i] * other
            targets[i, second[i]] = blend[i]
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return TrainingBatch(
        images=degrade(tensor, gen),
        style_targets=torch.from_numpy(targets),
        shapes=torch.tensor([SHAPES.index(s) for s, _ in subjects]),
        colours=torch.tensor([COLOUR_NAMES.index(c) for _, c in subjects]),
    )


def train(plan: TrainingPlan, *, log_every: int = 100) -> Evaluator:
    """Train a fresh network following `plan` and return it as an evaluator."""
    torch.manual_seed(plan.seed)
    config = EvaluatorConfig(styles=STYLES, shapes=SHAPES, colours=COLOUR_NAMES)
    network = StyleContentNet(config)
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
        style_logits, shape_logits, colour_logits = network(batch.images)
        loss = (
            F.cross_entropy(style_logits, batch.style_targets)
            + F.cross_entropy(shape_logits, batch.shapes)
            + F.cross_entropy(colour_logits, batch.colours)
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"step {step}/{plan.steps} loss {loss.item():.4f}", flush=True)
    return Evaluator(network.eval(), config)


def heldout_sets(seed: int, per_style: int) -> dict[str, Batch]:
    """Held-out data never seen in training: canonical renderings and unseen devices' data."""
    canonical = [style_dataset(style, per_style, seed=10_000 + seed) for style in STYLES]
    devices = [
        make_device(style, index, seed=10_000 + seed).heldout(per_style // 4)
        for style in DEVICE_STYLES
        for index in range(4)
    ]
    return {"canonical": Batch.concat(canonical), "unseen devices": Batch.concat(devices)}


def accuracy(evaluator: Evaluator, images: torch.Tensor, batch: Batch) -> dict[str, float]:
    """Style, shape and colour accuracy of the evaluator on labelled images."""
    probs = evaluator.predict(images)
    return {
        "style": float(matches(probs.predicted_styles(), batch.styles).mean()),
        "shape": float(matches(probs.predicted_shapes(), batch.shapes).mean()),
        "colour": float(matches(probs.predicted_colours(), batch.colours).mean()),
    }


def heldout_report(evaluator: Evaluator, *, seed: int = 0, per_style: int = 200) -> dict[str, Any]:
    """Accuracy per head on held-out sets: clean, degraded as in training, and degraded harder."""
    report: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(10_000 + seed)
    for name, batch in heldout_sets(seed, per_style).items():
        clean = to_tensor(batch.images)
        report[f"{name}, clean"] = accuracy(evaluator, clean, batch) | {"n": len(batch)}
        degraded = degrade(clean, gen)
        report[f"{name}, degraded"] = accuracy(evaluator, degraded, batch) | {"n": len(batch)}
        harsh = degrade(clean, gen, max_blur=1.8, max_noise=0.25, colour_strength=0.12)
        report[f"{name}, harsher than training"] = accuracy(evaluator, harsh, batch) | {
            "n": len(batch)
        }
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The held-out report as a markdown table."""
    lines = ["| held-out set | images | style | shape | colour |", "|---|---|---|---|---|"]
    for name, row in report.items():
        lines.append(
            f"| {name} | {row['n']} | {row['style']:.3f} | {row['shape']:.3f} "
            f"| {row['colour']:.3f} |"
        )
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
