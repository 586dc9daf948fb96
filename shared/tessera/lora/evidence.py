"""Evidence that one adapter learns a style in few steps, and that a blend carries two styles.

    python -m tessera.lora.evidence --out docs

Trains one adapter per device style with `train_lora` on that style's images and their plain
captions (the style is never named), scoring generations at each checkpoint. Then, for every
pair of styles, generates the same prompts and noise under blends of the two adapters and
reports the share of images that carry both styles' attributes (`Evaluator.hybrid`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.data import DEVICE_STYLES, LOOKS, caption, cycled_subjects, style_dataset, to_tensor
from tessera.data.evaluator import Evaluator, load_evaluator
from tessera.data.tensors import to_uint8
from tessera.lora.adapter import LoraAdapter
from tessera.lora.files import adapter_from_bytes, adapter_to_bytes
from tessera.lora.train import train_lora
from tessera.model.base import BaseModel, load_base_model
from tessera.model.conditioning import Conditioning
from tessera.model.generate import generate
from tessera.model.latents import fit_images

GRID_PROMPTS = 8
GRID_HYBRIDS = 4
HYBRID = (1.0, 1.0)  # the equal hybrid (tessera.sim.hybrid.HYBRID_WEIGHTS)
BLEND_WEIGHTS = ((1.0, 0.5), HYBRID, (0.5, 1.0))  # the split moving from first to second
CONVEX = (0.5, 0.5)  # the convex blend, reported beside: it halves each adapter
HYBRID_LABEL, CONVEX_LABEL = "1/1", "0.5/0.5"


def eval_subjects(n: int, seed: int) -> list[tuple[str, str]]:
    """The evidence's evaluation subjects: every subject in turn, in a seeded order."""
    return cycled_subjects(n, seed, "evidence-subjects")


def save_grid(rows: list[torch.Tensor], labels: list[str], path: Path, tile: int = 128) -> None:
    """One row per condition (base, style A, ...), same prompts in each column, labelled.

    Images smaller than `tile` pixels are upscaled by a whole factor (nearest: pixels stay
    sharp), so the tiny model's 32x32 show at 128; larger ones keep their size.
    """
    from PIL import Image, ImageDraw

    arrays = [to_uint8(row) for row in rows]
    scale = max(1, tile // arrays[0].shape[1])
    columns, h, w = arrays[0].shape[0], arrays[0].shape[1] * scale, arrays[0].shape[2] * scale
    margin, gap = 150, 4
    canvas = Image.new("RGB", (margin + columns * (w + gap), len(rows) * (h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (array, label) in enumerate(zip(arrays, labels, strict=True)):
        top = r * (h + gap)
        draw.text((6, top + h // 2 - 6), label, fill="black")
        for c, image in enumerate(array):
            cell = Image.fromarray(image).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(cell, (margin + c * (w + gap), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


class _Scorer:
    """Generates the evidence's prompts under a mix and scores them; counts generation time."""

    def __init__(self, base: BaseModel, evaluator: Evaluator, args: argparse.Namespace):
        self.base, self.evaluator, self.args = base, evaluator, args
        self.subjects = eval_subjects(args.n, args.seed)
        self.prompts = base.prompts.encode([caption(s, c) for s, c in self.subjects])
        self.seconds = 0.0

    def images(self, mix: list[tuple[LoraAdapter, float]]) -> torch.Tensor:
        """The prompts drawn under `mix`, at the evaluator's resolution."""
        started = time.perf_counter()
        drawn = generate(
            self.base,
            self.prompts,
            mix,
            steps=self.args.sample_steps,
            guidance=self.args.guidance,
            seed=self.args.seed,
        ).images
        self.seconds += time.perf_counter() - started
        assert drawn is not None
        return fit_images(drawn, self.evaluator.config.image_size)

    def style(self, images: torch.Tensor, style: str) -> dict[str, Any]:
        """Style share and content accuracy of images meant to be in `style`."""
        scores = self.evaluator.evaluate(images, style=style, content=self.subjects)
        return {
            "style_share": scores.style_share,
            "colour_accuracy": scores.colour_accuracy,
            "shape_accuracy": scores.shape_accuracy,
            "votes": scores.style_votes,
        }


def _train_style(
    base: BaseModel, scorer: _Scorer, style: str, args: argparse.Namespace
) -> tuple[LoraAdapter, dict[str, Any]]:
    """Train (or reload) a style's adapter, scoring generations at every checkpoint."""
    if args.adapters is not None:
        saved = args.adapters / f"lora_evidence_{style}.safetensors"
        reloaded = adapter_from_bytes(saved.read_bytes(), base.lora_spec)
        return reloaded, json.loads(reloaded.extra["evidence"])
    data = style_dataset(style, args.images, args.seed)
    captions: Conditioning = base.prompts.encode(data.captions)
    adapter: LoraAdapter | None = None
    curve: dict[str, float | None] = {}
    losses: list[float] = []
    seconds, done = 0.0, 0
    for checkpoint in sorted({*args.checkpoints, args.steps}):
        result = train_lora(
            base,
            to_tensor(data.images),
            captions,
            init=adapter,
            rank=None if adapter is not None else args.rank,
            alpha=None if adapter is not None else args.alpha,
            steps=checkpoint - done,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed + done,
            progress=args.progress,
        )
        adapter, done = result.adapter, checkpoint
        losses += result.losses
        seconds += result.seconds
        curve[str(checkpoint)] = scorer.style(scorer.images([(adapter, 1.0)]), style)["style_share"]
    assert adapter is not None
    training = {
        "curve": curve,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, args.steps), 3),
        "first_loss": float(np.mean(losses[:10])),
        "final_loss": float(np.mean(losses[-20:])),
    }
    return adapter.with_extra(style=style, evidence=json.dumps(training)), training


def _pair(
    scorer: _Scorer,
    adapters: dict[str, LoraAdapter],
    alone: dict[str, torch.Tensor],
    pair: tuple[str, str],
) -> dict[str, Any]:
    """Hybrid scores of a pair: each adapter alone, every blend of `BLEND_WEIGHTS` (only the
    equal hybrid where the styles conflict) and the convex 50/50 blend."""
    first, second = pair
    evaluator = scorer.evaluator
    conflicting = LOOKS[first].combined(LOOKS[second]) is None
    weights = [HYBRID] if conflicting else list(BLEND_WEIGHTS)
    rows: dict[str, dict[str, Any]] = {
        f"{first} alone": evaluator.hybrid(alone[first], pair).to_dict()
    }
    images: dict[str, torch.Tensor] = {}
    for a, b in weights:
        label = f"{a:g}/{b:g}"
        images[label] = scorer.images([(adapters[first], a), (adapters[second], b)])
        rows[label] = evaluator.hybrid(images[label], pair).to_dict()
    rows[f"{second} alone"] = evaluator.hybrid(alone[second], pair).to_dict()
    firsts = [row["carries_first"] for row in rows.values()]
    seconds = [row["carries_second"] for row in rows.values()]
    convex = scorer.images([(adapters[first], CONVEX[0]), (adapters[second], CONVEX[1])])
    rows[CONVEX_LABEL] = evaluator.hybrid(convex, pair).to_dict()
    monotonic = all(x >= y for x, y in pairwise(firsts)) and all(
        x <= y for x, y in pairwise(seconds)
    )
    return {
        "styles": list(pair),
        "conflicting": rows[f"{first} alone"]["conflicting"],
        "rows": rows,
        "monotonic": monotonic,
        "images_hybrid": images[HYBRID_LABEL],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, generate, score; return every number the report shows."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_base_model(args.model)
    scorer = _Scorer(base, load_evaluator(), args)
    base_images = scorer.images([])
    adapters: dict[str, LoraAdapter] = {}
    styles: dict[str, dict[str, Any]] = {}
    alone: dict[str, torch.Tensor] = {}
    for style in args.styles:
        adapters[style], training = _train_style(base, scorer, style, args)
        if args.out is not None:
            path = args.out / f"lora_evidence_{style}.safetensors"
            path.write_bytes(adapter_to_bytes(adapters[style]))
        alone[style] = scorer.images([(adapters[style], 1.0)])
        styles[style] = {
            "changes": LOOKS[style].changes(),
            "base": scorer.style(base_images, style)["style_share"],
            "training": training,
            **scorer.style(alone[style], style),
        }
    pairs = [_pair(scorer, adapters, alone, pair) for pair in combinations(args.styles, 2)]
    if args.out is not None:
        hybrids = [p for p in pairs if not p["conflicting"]]
        hybrids.sort(key=lambda p: -p["rows"][HYBRID_LABEL]["carries_both"])
        rows = [base_images[:GRID_PROMPTS]] + [alone[s][:GRID_PROMPTS] for s in args.styles]
        rows += [p["images_hybrid"][:GRID_PROMPTS] for p in hybrids[:GRID_HYBRIDS]]
        labels = ["base", *(f"{s} LoRA" for s in args.styles)]
        labels += [f"{p['styles'][0]}+{p['styles'][1]} 1/1" for p in hybrids[:GRID_HYBRIDS]]
        save_grid(rows, labels, args.out / "lora_evidence.png")
    return {
        "styles": styles,
        "pairs": [{k: v for k, v in p.items() if k != "images_hybrid"} for p in pairs],
        "settings": {
            k: v for k, v in vars(args).items() if k not in {"out", "model", "progress", "adapters"}
        },
        "base_model": {"id": base.model_id, "hash": base.fingerprint[:16], "targets": base.targets},
        "adapter_parameters": next(iter(adapters.values())).parameters,
        "generation_seconds": round(scorer.seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "adapters_reused": args.adapters is not None,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{base.device.type.upper()}",
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    from tessera.lora.evidence_report import report_markdown

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--styles", nargs="+", default=list(DEVICE_STYLES))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--checkpoints", type=lambda text: [int(x) for x in text.split(",")], default=[25, 50]
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--adapters", type=Path, default=None, help="reuse the adapters an earlier run saved here"
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if len(args.styles) < 2:
        parser.error("--styles needs at least two styles, to blend")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        (args.out / "lora_evidence.json").write_text(text + "\n")
        (args.out / "lora_evidence.md").write_text(report_markdown(result))


if __name__ == "__main__":
    main()
