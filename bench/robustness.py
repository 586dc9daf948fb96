"""Robustness: what one or two attackers in a cluster of 8 do to its adapter, per strategy.

    OMP_WAIT_POLICY=PASSIVE python bench/robustness.py --threads 1 --out docs

Ten devices of the synthetic style dataset each train a rank-4 LoRA on their own images
(`train_lora`, the bundled model): eight of one style (`--style`), two of another (`--other`).
A cluster is 8 devices; with k = 1 or 2 attackers, the last k of the eight send, instead of
their honest update: B x1000 (`scaled`), B x -1 (`flipped`), random factors with their honest
update's norm (`noise`), or an update trained on the other style (`other_style`); `honest`
(they send their honest update) is the yardstick: what k more honest devices change. Each
strategy aggregates the cluster into a rank-32 adapter (8 x 4: exact, nothing truncated):

- `unbounded`: `aggregate_exact` over every update, weighted by samples (before bounding);
- `clip`: the worker's path (`aggregate_plan`, each update read from the embedded SeaweedFS)
  with the round defaults: weights capped, norms clipped at twice the median, no robust rule;
- `norm`: the same with `robust: norm` (norms over 3 medians rejected);
- `trimmed-1` / `trimmed-2`: `robust: trimmed` dropping 1 / 2 of the 8 (`robust_trim` 0.125
  / 0.25), the operator assuming at most 1 / 2 attackers;
- `krum-1` / `krum-2`: `robust: krum` with `robust_f` 1 / 2.

Reported per (strategy, attack, k): the relative change of the cluster adapter's products
against the exact mean of the benign updates alone, `||P - P_benign|| / ||P_benign||`, and the
style share of `--n` generations with the cluster adapter (the shipped evaluator; same prompts
and noise for every adapter), beside the benign aggregate's own. An adapter within
SAME_ADAPTER of one already scored reuses its score (its generations are the same images).
Writes docs/bench_robustness.md, .json and .png (with `--synthetic`:
docs/bench_robustness_synthetic.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from benchlib import common_arguments, embedded_backends, machine, write_report

from services.worker.aggregation import RoundPlan, UpdateRef, aggregate_plan
from tessera.data import caption, cycled_subjects, make_device, to_tensor
from tessera.data.evaluator import Evaluator, load_evaluator
from tessera.federation import GLOBAL_ADAPTER, RoundConfig, update_key
from tessera.lora import LoraAdapter, LoraSpec, adapter_to_bytes, random_adapter
from tessera.lora.adapter import B_SUFFIX
from tessera.lora.aggregate import WeightedUpdate, aggregate_exact
from tessera.lora.bounds import ScaleRange, publish_problem, update_norm
from tessera.lora.train import train_lora
from tessera.model.base import BaseModel, load_base_model
from tessera.model.generate import generate
from tessera.model.latents import fit_images
from tessera.storage import ObjectStore

CLUSTER = 8
RANK = 4
AGGREGATE_RANK = CLUSTER * RANK
SAMPLES = 16
ATTACKS = ("honest", "scaled", "flipped", "noise", "other_style")
STRATEGIES: dict[str, dict[str, Any] | None] = {
    "unbounded": None,
    "clip": {},
    "norm": {"robust": "norm"},
    "trimmed-1": {"robust": "trimmed", "robust_trim": 0.125},
    "krum-1": {"robust": "krum", "robust_f": 1},
    "trimmed-2": {"robust": "trimmed", "robust_trim": 0.25},
    "krum-2": {"robust": "krum", "robust_f": 2},
}
SAME_ADAPTER = 1e-4  # relative distance of products under which two adapters count as one
AIM_CHANGE, AIM_POINTS = 0.05, 5.0  # the aim for one x1000 attacker
SCALES = ScaleRange(1e-3, 16.0)  # the settings' defaults


def train_devices(
    base: BaseModel, style: str, count: int, args: argparse.Namespace
) -> list[LoraAdapter]:
    """`count` devices of `style`, each a LoRA trained on its own images."""
    if args.synthetic:
        return synthetic_devices(base, style, count, args.seed)
    adapters = []
    for index in range(count):
        batch = make_device(style, index, args.seed).samples(args.images)
        result = train_lora(
            base,
            to_tensor(batch.images),
            base.prompts.encode(batch.captions),
            rank=RANK,
            alpha=float(RANK),
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed + index,
            progress=False,
        )
        adapters.append(result.adapter)
        print(f"trained {style} device {index}", flush=True)
    return adapters


def synthetic_devices(base: BaseModel, style: str, count: int, seed: int) -> list[LoraAdapter]:
    """`count` updates that learnt alike: one random update per style plus 10% noise each."""
    spec = base.lora_spec
    offset = 1_000 * (1 + sum(map(ord, style)))
    common = random_adapter(spec, RANK, float(RANK), seed=seed + offset, std=0.3)
    return [
        dataclasses.replace(
            common,
            tensors={
                key: value
                + random_adapter(
                    spec, RANK, float(RANK), seed=seed + offset + 1 + i, std=0.03
                ).tensors[key]
                for key, value in common.tensors.items()
            },
        )
        for i in range(count)
    ]


def scaled_factors(adapter: LoraAdapter, *, a: float, b: float) -> LoraAdapter:
    tensors = {
        key: value * (b if key.endswith(B_SUFFIX) else a) for key, value in adapter.tensors.items()
    }
    return dataclasses.replace(adapter, tensors=tensors)


def attack(kind: str, own: LoraAdapter, other: LoraAdapter, seed: int) -> LoraAdapter:
    """The update an attacker sends instead of its honest one (`own`); `honest`: `own`."""
    if kind == "honest":
        return own
    if kind == "scaled":
        return scaled_factors(own, a=1.0, b=1000.0)
    if kind == "flipped":
        return scaled_factors(own, a=1.0, b=-1.0)
    if kind == "noise":
        noise = random_adapter(_spec_of(own), RANK, own.alpha, seed=10_000 + seed, std=0.1)
        root = math.sqrt(update_norm(own) / update_norm(noise))
        return scaled_factors(noise, a=root, b=root)
    if kind == "other_style":
        return other
    raise ValueError(f"unknown attack {kind!r}")


def _spec_of(adapter: LoraAdapter) -> LoraSpec:
    return LoraSpec(
        base_model_id=adapter.base_model_id,
        base_model_hash=adapter.base_model_hash,
        modules={m: adapter.weight_shape(m) for m in adapter.modules},
        targets=adapter.targets,
    )


def products(adapters: list[LoraAdapter]) -> dict[str, torch.Tensor]:
    """The exact mean of the adapters' products, per module, in float64."""
    return {
        m: sum(a.delta(m).double() for a in adapters) / len(adapters) for m in adapters[0].modules
    }


def relative_change(adapter: LoraAdapter, reference: dict[str, torch.Tensor]) -> float:
    err = sum(float((adapter.delta(m).double() - r).square().sum()) for m, r in reference.items())
    norm = sum(float(r.square().sum()) for r in reference.values())
    return math.sqrt(err / norm)


def aggregate(
    strategy: str, updates: list[LoraAdapter], store: ObjectStore, round_id: int
) -> tuple[LoraAdapter | None, int]:
    """The cluster adapter under `strategy` (None: nothing published), and updates excluded."""
    options = STRATEGIES[strategy]
    if options is None:
        weighted = [WeightedUpdate(u, float(SAMPLES)) for u in updates]
        return aggregate_exact(weighted, rank=AGGREGATE_RANK).adapter, 0
    refs = []
    for index, update in enumerate(updates):
        data = adapter_to_bytes(update)
        key = update_key(round_id, index + 1, hashlib.sha256(data).hexdigest())
        stored = store.put_bytes(key, data)
        refs.append(UpdateRef(index + 1, index + 1, stored.key, stored.sha256, SAMPLES, None))
    plan = RoundPlan(
        round_id=round_id,
        config=RoundConfig(scope="global", rank=AGGREGATE_RANK, lam=0.0, **options),
        opened_at=datetime.now(UTC),
        clustering_id=None,
        groups={None: refs},
        centroids={},
    )
    result = aggregate_plan(plan, store=store, scales=SCALES)
    published = {output.name: output.adapter for output in result.outputs}
    return published.get(GLOBAL_ADAPTER), len(result.excluded)


class StyleScore:
    """Style share of the cluster adapter's generations of fixed prompts and noise."""

    def __init__(self, base: BaseModel, evaluator: Evaluator, args: argparse.Namespace) -> None:
        self.base, self.evaluator, self.args = base, evaluator, args
        self.subjects = cycled_subjects(args.n, args.seed, "robustness-subjects")
        self.prompts = base.prompts.encode([caption(s, c) for s, c in self.subjects])
        self.scored: list[tuple[dict[str, torch.Tensor], float]] = []
        self.generated = 0

    def __call__(self, adapter: LoraAdapter | None) -> float | None:
        if self.args.synthetic:
            return None  # synthetic updates draw no style
        if adapter is None or publish_problem(adapter) is not None:
            return None  # not published: nothing to generate with
        mine = products([adapter])
        for seen, share in self.scored:
            if relative_change(adapter, seen) < SAME_ADAPTER:
                return share
        share = self._generate(adapter)
        self.scored.append((mine, share))
        return share

    def _generate(self, adapter: LoraAdapter) -> float:
        self.generated += 1
        images = generate(
            self.base,
            self.prompts,
            [(adapter, 1.0)],
            steps=self.args.sample_steps,
            guidance=self.args.guidance,
            seed=self.args.seed,
        ).images
        assert images is not None
        fitted = fit_images(images, self.evaluator.config.image_size)
        scores = self.evaluator.evaluate(fitted, style=self.args.style, content=self.subjects)
        return float(scores.style_share)


def run(args: argparse.Namespace, store: ObjectStore) -> dict[str, Any]:
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    base = load_base_model()
    honest = train_devices(base, args.style, CLUSTER, args)
    others = train_devices(base, args.other, 2, args)
    score = StyleScore(base, load_evaluator(), args)
    rows: list[dict[str, Any]] = []
    benign: dict[int, dict[str, Any]] = {}
    round_id = 0
    for k in args.attackers:
        kept = honest[: CLUSTER - k]
        reference = products(kept)
        reference_adapter = aggregate_exact(
            [WeightedUpdate(u, 1.0) for u in kept], rank=AGGREGATE_RANK
        ).adapter
        benign[k] = {"style_share": score(reference_adapter)}
        for kind in args.attacks:
            sent = kept + [
                attack(kind, honest[CLUSTER - k + i], others[i], seed=i) for i in range(k)
            ]
            for strategy in args.strategies:
                round_id += 1
                adapter, excluded = aggregate(strategy, sent, store, round_id)
                finite = adapter is not None and publish_problem(adapter) is None
                row = {
                    "attackers": k,
                    "attack": kind,
                    "strategy": strategy,
                    "relative_change": relative_change(adapter, reference) if finite else None,
                    "fp16_safe": finite,
                    "excluded": excluded,
                    "style_share": score(adapter),
                    "benign_style_share": benign[k]["style_share"],
                }
                rows.append(row)
                print(row, flush=True)
    return {
        "settings": {
            k: v for k, v in vars(args).items() if k not in {"out", "report_only", "threads"}
        },
        "benign": {str(k): v for k, v in benign.items()},
        "rows": rows,
        "machine": machine(args.threads),
        "load_at_start": [round(x, 1) for x in load_at_start],
        "generation_runs": score.generated,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:,.1f}%" if value < 100 else f"{100 * value:,.0f}%"


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    strategies = settings["strategies"]
    synthetic = bool(settings.get("synthetic"))
    start_load = ", ".join(f"{x:.1f}" for x in report.get("load_at_start", []))
    by_key = {(r["attackers"], r["attack"], r["strategy"]): r for r in report["rows"]}
    cases = sorted({(r["attackers"], r["attack"]) for r in report["rows"]})
    header = [
        "| k | attack | " + " | ".join(strategies) + " |",
        "|---|---|" + "---|" * len(strategies),
    ]
    lines = [
        "# Robustness of a cluster's adapter to attackers",
        "",
        f"Written by `{report['command']}`"
        + (
            ""
            if synthetic
            else " (`make bench` runs it with `--threads 1`: MKL's threads crawl on a busy machine)"
        )
        + f"; {report['machine']}, at the start {start_load}; "
        f"{report['wall_seconds']:.0f} s, {report.get('generation_runs', '?')} generation runs.",
        "",
        *([f"**Partial run**: {report['partial']}.", ""] if report.get("partial") else []),
        (
            f"**Synthetic updates, not trained**: a cluster of {CLUSTER} devices whose honest "
            f"updates are one random rank-{RANK} update plus 10% noise each, so honest devices "
            "are far closer together than trained ones (docs/bench_robustness.md); no "
            "generations, so no style share. The cluster is "
            if synthetic
            else f"A cluster of {CLUSTER} devices of style `{settings['style']}` (each a "
            f"rank-{RANK} LoRA trained {settings['steps']} steps on {settings['images']} images "
            "of its own), "
        )
        + f"aggregated to rank {AGGREGATE_RANK} (exact). With k attackers, the last k devices send "
        "B x1000 (`scaled`), B x -1 (`flipped`), random factors of their honest update's norm "
        f"(`noise`) or an update trained on `{settings['other']}` (`other_style`); with "
        "`honest` they send their own honest update: the yardstick of how much k more honest "
        "devices move the aggregate.",
        "",
        "Strategies: `unbounded` is plain exact aggregation (before bounded influence); `clip` "
        "is the worker's default (weights capped, norms clipped at twice the median); `norm` "
        "adds `robust: norm` (updates whose norm is over 3 times the cluster's median are "
        "rejected); `trimmed-f` adds `robust: trimmed` dropping f of the 8 farthest from the "
        "median; `krum-f` adds `robust: krum` with `robust_f` f (n - f kept). f is what the "
        "operator assumes, whatever k is.",
        "",
        "Relative change of the cluster adapter's products against the exact mean of the "
        "benign updates alone (— : not finite or not fp16-safe, so never published):",
        "",
        *header,
    ]
    for k, kind in cases:
        cells = [_percent(by_key[(k, kind, s)]["relative_change"]) for s in strategies]
        lines.append(f"| {k} | {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Style share (`{settings['style']}`) of {settings['n']} generations with the cluster "
        "adapter (benign aggregate: "
        + ", ".join(
            f"k={k}: {_share(v['style_share'])}" for k, v in sorted(report["benign"].items())
        )
        + "), and updates excluded:",
        "",
        *header,
    ]
    for k, kind in cases:
        cells = [
            f"{_share(by_key[(k, kind, s)]['style_share'])} ({by_key[(k, kind, s)]['excluded']})"
            for s in strategies
        ]
        lines.append(f"| {k} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", *_aim(report, by_key), ""]
    return "\n".join(lines)


def _aim(report: dict[str, Any], by_key: dict[tuple[int, str, str], Any]) -> list[str]:
    """The issue's aim, read off the rows: one x1000 attacker, clipping on and a robust rule."""
    benign = report["benign"].get("1", {}).get("style_share")
    lines = [
        f"Aim: with clipping on and a robust rule, one x1000 attacker changes the cluster "
        f"adapter by less than {AIM_CHANGE:.0%} and style share by less than {AIM_POINTS:g} "
        "points:",
        "",
    ]
    for strategy in report["settings"]["strategies"]:
        row = by_key.get((1, "scaled", strategy))
        if row is None or strategy in ("unbounded", "clip"):
            continue
        change, share = row["relative_change"], row["style_share"]
        points = None if share is None or benign is None else 100 * abs(share - benign)
        met = change is not None and change < AIM_CHANGE and (points is None or points < AIM_POINTS)
        shown = "not scored" if points is None else f"{points:.1f} points"
        lines.append(f"- `{strategy}`: {_percent(change)}, {shown}: {'met' if met else 'not met'}")
    return lines


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    strategies = report["settings"]["strategies"]
    cases = sorted({(r["attackers"], r["attack"]) for r in report["rows"]})
    by_key = {(r["attackers"], r["attack"], r["strategy"]): r for r in report["rows"]}
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(strategies)
    for index, strategy in enumerate(strategies):
        values = [by_key[(k, kind, strategy)]["relative_change"] for k, kind in cases]
        heights = [v if v is not None else float("nan") for v in values]
        axis.bar([i + index * width for i in range(len(cases))], heights, width, label=strategy)
    axis.set_yscale("log")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    axis.set_xticklabels([f"k={k}\n{kind}" for k, kind in cases], fontsize=8)
    axis.set_ylabel("relative change vs benign aggregate")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--style", default="stripes")
    parser.add_argument("--other", default="dots")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attackers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="honest updates made up (one random update plus 10%% noise each), not trained; "
        "no generations scored: relative change only, in seconds",
    )
    common_arguments(parser)
    args = parser.parse_args(argv)
    # A synthetic run never overwrites the trained run's report.
    name = "bench_robustness_synthetic" if args.synthetic else "bench_robustness"
    if args.report_only:
        import json

        report = json.loads((args.out / f"{name}.json").read_text())
        write_report(report, args.out, name, markdown=markdown, plot=plot)
        return
    torch.set_num_threads(args.threads)
    with (
        tempfile.TemporaryDirectory() as scratch,
        embedded_backends(Path(scratch) / "backends") as (_, store),
    ):
        report = run(args, store)
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    report["command"] = f"OMP_WAIT_POLICY=PASSIVE python bench/robustness.py {arguments}"
    write_report(report, args.out, name, markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
