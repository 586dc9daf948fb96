"""Evidence that a LoRA carries a style and that blends split it, written to docs/.

    python -m tessera.lora.evidence --styles night stripes --out docs

Trains one adapter per style with `train_lora` on that style's images and their plain
captions (the style is never named), generates the same prompts and noise with the base,
each adapter and a 50/50 blend, and scores every set with the shipped evaluator.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.data import caption, cycled_subjects, style_dataset, to_tensor
from tessera.data.evaluator import load_evaluator
from tessera.data.tensors import to_uint8
from tessera.lora.adapter import LoraAdapter
from tessera.lora.files import adapter_from_bytes, adapter_to_bytes
from tessera.lora.train import train_lora
from tessera.model.base import BaseModel, load_base_model
from tessera.model.generate import generate
from tessera.model.latents import fit_images

GRID_PROMPTS = 8


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
    margin, gap = 110, 4
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


TRAINING_FIELDS = ("seconds", "seconds_per_step", "first_loss", "final_loss")


def _trained(base: BaseModel, style: str, args: argparse.Namespace) -> LoraAdapter:
    """Train the style's adapter, or reuse the one saved by an earlier run (--adapters DIR)."""
    if args.adapters is not None:
        saved = args.adapters / f"lora_evidence_{style}.safetensors"
        return adapter_from_bytes(saved.read_bytes(), base.lora_spec)
    data = style_dataset(style, args.images, args.seed)
    result = train_lora(
        base,
        to_tensor(data.images),  # resized to the model's resolution by train_lora
        base.prompts.encode(data.captions),
        rank=args.rank,
        alpha=args.alpha,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=args.progress,
    )
    return result.adapter.with_extra(
        seconds=f"{result.seconds:.1f}",
        seconds_per_step=f"{result.seconds / max(1, args.steps):.3f}",
        first_loss=f"{np.mean(result.losses[:10]):.4f}",
        final_loss=f"{np.mean(result.losses[-20:]):.4f}",
        style=style,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, generate, score; return every number the report shows."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_base_model(args.model)
    evaluator = load_evaluator()
    style_a, style_b = args.styles
    subjects = eval_subjects(args.n, args.seed)
    prompts = base.prompts.encode([caption(s, c) for s, c in subjects])

    adapters: dict[str, LoraAdapter] = {}
    training: dict[str, dict[str, float]] = {}
    for style in (style_a, style_b):
        adapters[style] = _trained(base, style, args)
        training[style] = {k: float(adapters[style].extra[k]) for k in TRAINING_FIELDS}
        if args.out is not None:
            (args.out / f"lora_evidence_{style}.safetensors").write_bytes(
                adapter_to_bytes(adapters[style])
            )

    mixes = {
        "base": [],
        style_a: [(adapters[style_a], 1.0)],
        style_b: [(adapters[style_b], 1.0)],
        "blend": [(adapters[style_a], 0.5), (adapters[style_b], 0.5)],
        "blend 0.7/0.3": [(adapters[style_a], 0.7), (adapters[style_b], 0.3)],
        "blend 0.3/0.7": [(adapters[style_a], 0.3), (adapters[style_b], 0.7)],
    }
    conditions: dict[str, dict[str, Any]] = {}
    grid_rows: list[torch.Tensor] = []
    generation_seconds = 0.0
    for name, mix in mixes.items():
        t0 = time.perf_counter()
        images = generate(
            base, prompts, mix, steps=args.sample_steps, guidance=args.guidance, seed=args.seed
        ).images
        generation_seconds += time.perf_counter() - t0
        assert images is not None
        scored = fit_images(images, evaluator.config.image_size)  # the evaluator's own size
        scores = evaluator.evaluate(scored, content=subjects)
        conditions[name] = {
            f"share_{style_a}": scores.style_votes[style_a],
            f"share_{style_b}": scores.style_votes[style_b],
            f"probability_{style_a}": scores.style_mix[style_a],
            f"probability_{style_b}": scores.style_mix[style_b],
            "colour_accuracy": scores.colour_accuracy,
            "shape_accuracy": scores.shape_accuracy,
            "votes": scores.style_votes,
            "other": max(
                ((s, v) for s, v in scores.style_votes.items() if s not in (style_a, style_b)),
                key=lambda item: item[1],
            ),
        }
        if name in ("base", style_a, style_b, "blend"):
            grid_rows.append(images[:GRID_PROMPTS])
    if args.out is not None:
        save_grid(
            grid_rows,
            ["base", f"{style_a} LoRA", f"{style_b} LoRA", "50/50 blend"],
            args.out / "lora_evidence.png",
        )
    return {
        "styles": [style_a, style_b],
        "settings": {
            k: v for k, v in vars(args).items() if k not in {"out", "model", "progress", "adapters"}
        },
        "base_model": {"id": base.model_id, "hash": base.fingerprint[:16]},
        "adapter_parameters": adapters[style_a].parameters,
        "training": training,
        "conditions": conditions,
        "generation_seconds": round(generation_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "adapters_reused": args.adapters is not None,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{base.device.type.upper()}",
    }


def report_markdown(result: dict[str, Any]) -> str:
    """The docs page: the table of style shares per condition and the grid."""
    a, b = result["styles"]
    s = result["settings"]
    lines = [
        "# LoRA evidence: one adapter carries a style, a blend splits it",
        "",
        "Generated by `python -m tessera.lora.evidence "
        f"--styles {a} {b} --steps {s['steps']} --out docs` "
        f"in {result['wall_seconds'] / 60:.1f} min ({result['machine']})"
        + (
            ", reusing the adapters an earlier run of the same command trained and saved "
            "(`--adapters`); their training times are in the second table."
            if result.get("adapters_reused")
            else "."
        ),
        "",
        f"Each adapter: rank {s['rank']}, alpha {s['alpha']}, {result['adapter_parameters']:,} "
        f"parameters, {s['steps']} steps at batch {s['batch_size']} (lr {s['lr']}) on "
        f"{s['images']} images of its style with their plain captions. "
        f"{s['n']} prompts, {s['sample_steps']} DDIM steps, guidance {s['guidance']}, the same "
        "noise in every row. Scored by the shipped evaluator (`tessera.data.evaluator`).",
        "",
        f"| condition | classified {a} | classified {b} | p({a}) | p({b}) | most common other "
        "class | colour acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in result["conditions"].items():
        label = f"{name} LoRA" if name in (a, b) else name
        lines.append(
            f"| {label} | {c[f'share_{a}']:.3f} | {c[f'share_{b}']:.3f} | "
            f"{c[f'probability_{a}']:.3f} | {c[f'probability_{b}']:.3f} | "
            f"{c['other'][0]} {c['other'][1]:.3f} | {c['colour_accuracy']:.3f} |"
        )
    lines += [
        "",
        "Training time:",
        "",
        "| style | seconds | s/step | loss first 10 | loss last 20 |",
    ]
    lines.append("|---|---|---|---|---|")
    for style, t in result["training"].items():
        lines.append(
            f"| {style} | {t['seconds']} | {t['seconds_per_step']} | {t['first_loss']:.4f} | "
            f"{t['final_loss']:.4f} |"
        )
    c = result["conditions"]
    lines += [
        "",
        "Reading:",
        "",
        f"- The {b} adapter turns {c['base'][f'share_{b}']:.0%} of base generations into "
        f"{c[b][f'share_{b}']:.0%} classified {b}; the {a} adapter {c['base'][f'share_{a}']:.0%} "
        f"into {c[a][f'share_{a}']:.0%} {a}.",
        f"- The 50/50 blend puts p({a}) at {c['blend'][f'probability_{a}']:.3f} and p({b}) at "
        f"{c['blend'][f'probability_{b}']:.3f} (base: {c['base'][f'probability_{a}']:.3f} and "
        f"{c['base'][f'probability_{b}']:.3f}); moving the weights moves the split: 0.7/0.3 gives "
        f"{c['blend 0.7/0.3'][f'probability_{a}']:.3f} / "
        f"{c['blend 0.7/0.3'][f'probability_{b}']:.3f}, 0.3/0.7 gives "
        f"{c['blend 0.3/0.7'][f'probability_{a}']:.3f} / "
        f"{c['blend 0.3/0.7'][f'probability_{b}']:.3f}.",
        "- A blend is a new look that neither adapter was trained on, so the evaluator, trained "
        "on the seven pure styles only, often files it under its catch-all for textured, "
        'non-white backgrounds ("night"): the "most common other class" column. What the '
        "blend rows show is the balance between the two styles, not a pure style.",
    ]
    lines += [
        "",
        f"Rows: base, {a} LoRA, {b} LoRA, 50/50 blend; columns: the first {GRID_PROMPTS} prompts.",
        "",
        "![grid](lora_evidence.png)",
        "",
        "Raw numbers: [lora_evidence.json](lora_evidence.json).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--styles", nargs=2, default=["dots", "stripes"])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--n", type=int, default=40)
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
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        (args.out / "lora_evidence.json").write_text(text + "\n")
        (args.out / "lora_evidence.md").write_text(report_markdown(result))


if __name__ == "__main__":
    main()
