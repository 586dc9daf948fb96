"""Utility of secure mode: frozen A, B-only training against full LoRA with exact aggregation.

    python bench/secure_utility.py --out docs

Per style, a cluster of `--devices` devices, each with its own `--images` images of the style
(their plain captions; the style is never named), runs `--rounds` rounds of `--steps` local
steps from the cluster's adapter:
- exact: full LoRA (A and B train), aggregated by `aggregate_exact` (mean of the products,
  re-factorised to the rank), as a normal round does;
- secure: A frozen from the cluster's seed, only B trains (`train_lora(train_a=False)`), and the
  cluster adapter is the frozen A with the mean of B computed by the secure protocol itself
  (fixed-point encoding, pairwise masks, unmasking: `tessera.secagg`), as a secure round does.
After each round the cluster adapter generates the same prompts with the same noise, scored by
the shipped evaluator (style share: the share of generations whose most probable look is the
style's). Writes docs/bench_secure_utility.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import machine

from tessera.data import caption, style_dataset, to_tensor
from tessera.data.evaluator import load_evaluator
from tessera.lora.adapter import LoraAdapter
from tessera.lora.aggregate import WeightedUpdate, aggregate_exact
from tessera.lora.evidence import eval_subjects
from tessera.lora.train import train_lora
from tessera.model.base import BaseModel, load_base_model
from tessera.model.generate import generate
from tessera.model.latents import fit_images
from tessera.secagg.protocol import Participant, Peer, group_context, unmask_sum
from tessera.secagg.vector import (
    FixedPoint,
    device_input,
    frozen_a,
    frozen_adapter,
    unflatten_b,
    zero_b,
)

METHODS = ("exact", "secure")


def secure_mean(updates: list[LoraAdapter], base: BaseModel, value_range: float) -> np.ndarray:
    """The mean of the devices' B through the protocol: encode, mask, sum, unmask, decode."""
    spec = base.lora_spec
    ids = list(range(1, len(updates) + 1))
    context = group_context(0, 0)
    devices = {i: Participant(client_id=i, context=context, threshold=len(ids) - 1) for i in ids}
    peers = {i: Peer(i, i, d.c.public, d.s.public) for i, d in devices.items()}
    boxes = {i: d.share(list(peers.values())) for i, d in devices.items()}
    for i, device in devices.items():
        device.receive({s: box[i] for s, box in boxes.items() if s != i})
    fixed = FixedPoint(value_range, count=len(ids))
    total = np.zeros(0, dtype=np.uint32)
    for i, update in zip(ids, updates, strict=True):
        values = device_input(update, spec, weight=1.0, clip_norm=None).values
        masked = devices[i].mask(fixed.encode(values), ids)
        total = masked if total.size == 0 else total + masked
    reveals = {i: devices[i].reveal(ids) for i in ids}
    summed = fixed.decode(
        unmask_sum(
            total,
            peers=peers,
            shared=ids,
            masked=ids,
            reveals=reveals,
            threshold=len(ids) - 1,
            context=context,
        )
    )
    mean: np.ndarray = summed[:-1] / summed[-1]
    return mean


def run_style(
    base: BaseModel, style: str, method: str, args: argparse.Namespace, score: Any
) -> dict[str, Any]:
    spec = base.lora_spec
    data = [
        style_dataset(style, args.images, seed=args.seed * 100 + d) for d in range(args.devices)
    ]
    captions = [base.prompts.encode(batch.captions) for batch in data]
    a = frozen_a(spec, rank=args.rank, seed=args.seed)
    cluster: LoraAdapter | None = None
    if method == "secure":
        cluster = frozen_adapter(
            spec, a, zero_b(spec, rank=args.rank), rank=args.rank, alpha=float(args.rank)
        )
    curve, seconds, clipped_values = [], 0.0, 0
    for round_ in range(args.rounds):
        updates = []
        for d in range(args.devices):
            result = train_lora(
                base,
                to_tensor(data[d].images),
                captions[d],
                init=cluster,
                rank=None if cluster is not None else args.rank,
                alpha=None if cluster is not None else float(args.rank),
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                seed=args.seed + 1000 * round_ + d,
                train_a=method == "exact",
            )
            updates.append(result.adapter)
            seconds += result.seconds
        if method == "exact":
            weighted = [WeightedUpdate(u, 1.0) for u in updates]
            cluster = aggregate_exact(weighted, rank=args.rank, alpha=float(args.rank)).adapter
        else:
            clipped_values += sum(
                int(
                    (
                        np.abs(device_input(u, spec, weight=1.0, clip_norm=None).values)
                        > args.value_range
                    ).sum()
                )
                for u in updates
            )
            mean_b = unflatten_b(secure_mean(updates, base, args.value_range), spec, rank=args.rank)
            cluster = frozen_adapter(spec, a, mean_b, rank=args.rank, alpha=float(args.rank))
        share = score(cluster, style)
        curve.append(share)
        print(f"{style} {method} round {round_ + 1}: style share {share:.2f}", flush=True)
    return {"curve": curve, "train_seconds": round(seconds, 1), "clipped_values": clipped_values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--styles", nargs="+", default=["night", "pastel"])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--value-range", type=float, default=1.0)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_base_model()
    evaluator = load_evaluator()
    subjects = eval_subjects(args.prompts, args.seed)
    prompts = base.prompts.encode([caption(s, c) for s, c in subjects])

    def score(adapter: LoraAdapter, style: str) -> float:
        images = generate(
            base, prompts, [(adapter, 1.0)], steps=args.sample_steps, guidance=3.0, seed=args.seed
        ).images
        assert images is not None
        scores = evaluator.evaluate(
            fit_images(images, evaluator.config.image_size), style=style, content=subjects
        )
        return float(scores.style_share)

    results = {
        style: {method: run_style(base, style, method, args, score) for method in METHODS}
        for style in args.styles
    }
    report = {
        "results": results,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "targets": base.targets,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": machine(args.threads),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_secure_utility.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    rounds = settings["rounds"]
    head = "| style | method | " + " | ".join(f"round {r + 1}" for r in range(rounds))
    lines = [head + " | train s | B values clipped |", "|---" * (rounds + 4) + "|"]
    for style, methods in report["results"].items():
        for method, row in methods.items():
            curve = " | ".join(f"{share:.2f}" for share in row["curve"])
            clipped = row["clipped_values"] if method == "secure" else "-"
            lines.append(f"| {style} | {method} | {curve} | {row['train_seconds']} | {clipped} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
