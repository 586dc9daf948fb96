"""Differential privacy's utility cost on the RESULTS protocol: style accuracy at epsilon 8, 4, 1.

    python bench/dp_utility.py --out docs --seed 1

The RESULTS protocol (`tessera.sim.results.RESULTS_CONFIG`: 24 devices, 4 styles, 8 rounds,
the cluster-aware exact method, each on a fresh embedded stack) is run once per epsilon with
every round private: `noise_multiplier` calibrated by dp-accounting so that the 8 rounds spend
exactly epsilon at `--delta` (`tessera.privacy.noise_multiplier_for`), `clip: fixed`,
`weighting: equal`. The clip norm is fixed before the runs from a calibration set that is not
the federation's devices (devices of the same styles with another seed, trained from scratch
for the protocol's budget): twice their median update norm, as the default adaptive clip would
choose in round 1. The no-DP baseline is the committed RESULTS run of the same seed
(docs/results-runs/, not rerun). Each round's epsilon is read back from the aggregator's API
(`privacy.max_epsilon`). Also reported: the norm of the noise left in one cluster adapter after
the rank-8 re-factorisation, in clip norms, for clusters of 6 (this protocol) to 10,000 devices,
measured on zero updates. Writes docs/bench_dp.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import torch
from benchlib import machine, write_report

from tessera.data import make_device, to_tensor
from tessera.lora import LoraAdapter, random_adapter
from tessera.lora.aggregate import WeightedUpdate, aggregate_private
from tessera.lora.bounds import update_norm
from tessera.lora.train import train_lora
from tessera.model.base import load_base_model
from tessera.privacy import noise_multiplier_for
from tessera.sim.results import RESULTS_CONFIG, run_file
from tessera.sim.run import SimConfig, device_pool
from tessera.sim.stack import run_on_fresh_stack

NAME = "bench_dp"
BASELINE = "cluster-aware exact"
CALIBRATION_SEED_OFFSET = 1000
CLUSTER_SIZES = (6, 100, 1000, 10_000)


def calibrate_clip(config: SimConfig, *, devices: int) -> dict[str, Any]:
    """Twice the median update norm of `devices` calibration devices trained from scratch."""
    base = load_base_model()
    styles = config.chosen_styles()
    norms = []
    for i in range(devices):
        seed = config.seed + CALIBRATION_SEED_OFFSET
        profile = make_device(styles[i % len(styles)], i // len(styles), seed)
        batch = profile.samples(config.samples, seed=seed)
        result = train_lora(
            base,
            to_tensor(batch.images),
            base.prompts.encode(list(batch.captions)),
            rank=config.rank,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=CALIBRATION_SEED_OFFSET + i,
        )
        norms.append(update_norm(result.adapter))
    return {"norms": norms, "clip_norm": 2 * statistics.median(norms)}


def noise_left(multiplier: float, *, rank: int, sizes: tuple[int, ...]) -> dict[str, float]:
    """||noise in one cluster adapter|| / clip norm after re-factorising to `rank`, per size."""
    spec = load_base_model().lora_spec
    zero = random_adapter(spec, rank, float(rank), seed=0, std=0.0)
    left = {}
    for n in sizes:
        result = aggregate_private(
            [WeightedUpdate(zero, 1.0)],
            rank=rank,
            clip_norm=1.0,
            noise_multiplier=multiplier,
            count=n,
            generator=torch.Generator().manual_seed(n),
        )
        adapter: LoraAdapter = result.adapter
        squares = sum(float(adapter.delta(m).double().square().sum()) for m in adapter.modules)
        left[str(n)] = math.sqrt(squares)
    return left


def private_run(
    config: SimConfig, *, multiplier: float, clip_norm: float, scratch: Path, pool: Any
) -> dict[str, Any]:
    """One RESULTS run with every round private; each round's epsilon read from the API."""
    options = {
        "clip": "fixed",
        "clip_norm": clip_norm,
        "weighting": "equal",
        "noise_multiplier": multiplier,
    }
    epsilons: list[float] = []

    def after(info: Any, _report: Any) -> None:
        url = info.urls["aggregator"]
        headers = {"Authorization": f"Bearer {info.operator_token}"}
        rounds = httpx.get(f"{url}/v1/rounds", params={"limit": 100}, headers=headers).json()
        for shown in sorted(rounds, key=lambda r: r["number"]):
            epsilons.append(shown["privacy"]["max_epsilon"])

    started = time.perf_counter()
    report = run_on_fresh_stack(config, scratch, after=after, pool=pool, round_options=options)
    data = report.to_dict()
    data["epsilon_per_round"] = epsilons
    data["wall_seconds"] = round(time.perf_counter() - started, 1)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--runs", type=Path, default=Path("docs/results-runs"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--calibration-devices", type=int, default=8)
    parser.add_argument("--scratch", type=Path, default=Path(".tessera-bench-dp"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    json_path = args.out / f"{NAME}.json"
    config = replace(RESULTS_CONFIG, seed=args.seed, method="exact")
    if args.report_only:
        report = json.loads(json_path.read_text())
    else:
        report = json.loads(json_path.read_text()) if json_path.exists() else {}
        baseline = run_file(args.runs, BASELINE, config)
        if not baseline.exists():
            raise SystemExit(f"no committed no-DP run {baseline}: run tessera.sim.results first")
        report.update(
            command="python bench/dp_utility.py --out docs --seed "
            f"{args.seed} --epsilons {' '.join(f'{e:g}' for e in args.epsilons)}",
            seed=args.seed,
            epsilons=args.epsilons,
            delta=args.delta,
            rounds=config.rounds,
            baseline_file=str(baseline),
            baseline=json.loads(baseline.read_text()),
        )
        report.setdefault("calibration", calibrate_clip(config, devices=args.calibration_devices))
        clip_norm = report["calibration"]["clip_norm"]
        runs = report.setdefault("runs", {})
        with device_pool(config.workers) as pool:
            for epsilon in args.epsilons:
                key = f"{epsilon:g}"
                if key in runs:
                    continue
                multiplier = noise_multiplier_for(
                    epsilon=epsilon, delta=args.delta, rounds=config.rounds
                )
                print(f"== epsilon {key}: noise multiplier {multiplier:.3f}, clip {clip_norm:.4f}")
                run = private_run(
                    config,
                    multiplier=multiplier,
                    clip_norm=clip_norm,
                    scratch=args.scratch,
                    pool=pool,
                )
                run["noise_multiplier"] = multiplier
                run["noise_left"] = noise_left(multiplier, rank=config.rank, sizes=CLUSTER_SIZES)
                runs[key] = run
                report["machine"] = machine(1)
                args.out.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(report, indent=2) + "\n")  # kept after each run
        report["machine"] = machine(1)
        shutil.rmtree(args.scratch, ignore_errors=True)
    write_report(report, args.out, NAME, markdown=markdown, plot=plot)


def _curve(run: dict[str, Any], metric: str) -> list[float]:
    return [float(r[metric]) for r in run["rounds"]]


def markdown(report: dict[str, Any]) -> str:
    baseline = report["baseline"]
    runs = report.get("runs", {})
    lines = [
        "# Differential privacy: utility cost on the RESULTS protocol",
        "",
        f"    {report['command']}",
        "",
        f"RESULTS protocol (24 devices, 4 styles, 8 rounds, cluster-aware exact), seed "
        f"{report['seed']} only (one seed: the time was short). Every round private, noise "
        f"multiplier calibrated by dp-accounting's RDP accountant so that the {report['rounds']} "
        f"rounds spend epsilon at delta {report['delta']:g} (each device takes part in every "
        "round of its cluster, no amplification by sampling). Clip norm fixed before the runs: "
        f"{report['calibration']['clip_norm']:.4f}, twice the median update norm of "
        f"{len(report['calibration']['norms'])} calibration devices (other seeds) trained from "
        "scratch for the protocol's budget. The no-DP baseline is the committed run "
        f"`{report['baseline_file']}` (adaptive clip, sample weights; not rerun). "
        f"Measured on {report.get('machine', 'this machine')}.",
        "",
        "| epsilon (8 rounds) | noise multiplier | style accuracy, rounds 1..8 | final style "
        "accuracy | final held-out loss | epsilon after each round (API) |",
        "|---|---|---|---|---|---|",
    ]
    base_acc = _curve(baseline, "style_accuracy")
    lines.append(
        f"| no DP | - | {' / '.join(f'{a:.2f}' for a in base_acc)} | {base_acc[-1]:.2f} | "
        f"{_curve(baseline, 'heldout_loss')[-1]:.4f} | - |"
    )
    for key, run in runs.items():
        acc = _curve(run, "style_accuracy")
        eps = " / ".join(f"{e:.2f}" for e in run["epsilon_per_round"])
        lines.append(
            f"| {key} | {run['noise_multiplier']:.3f} | {' / '.join(f'{a:.2f}' for a in acc)} | "
            f"{acc[-1]:.2f} | {_curve(run, 'heldout_loss')[-1]:.4f} | {eps} |"
        )
    for epsilon in report.get("epsilons", []):
        if f"{epsilon:g}" not in runs:
            lines.append(f"| {epsilon:g} | - | not measured (no time left) | - | - | - |")
    lines += [
        "",
        "Noise left in one cluster adapter after the rank-8 re-factorisation, as a multiple of "
        "the clip norm (an honest update's product is at most one clip norm), by the number of "
        "devices in the cluster (measured on zero updates, `aggregate_private`):",
        "",
        "| epsilon | " + " | ".join(f"n = {n:,}" for n in CLUSTER_SIZES) + " |",
        "|---|" + "---|" * len(CLUSTER_SIZES),
    ]
    for key, run in runs.items():
        cells = " | ".join(f"{run['noise_left'][str(n)]:.2f}" for n in CLUSTER_SIZES)
        lines.append(f"| {key} | {cells} |")
    lines += ["", *_reading(report), ""]
    return "\n".join(lines)


def _reading(report: dict[str, Any]) -> list[str]:
    """What the table says, from its own numbers."""
    runs = report.get("runs", {})
    if not runs:
        return []
    base = _curve(report["baseline"], "style_accuracy")
    base_loss = _curve(report["baseline"], "heldout_loss")[-1]
    finals = ", ".join(
        f"{_curve(r, 'style_accuracy')[-1]:.2f} at epsilon {k}" for k, r in runs.items()
    )
    ratios = " / ".join(f"{_curve(r, 'heldout_loss')[-1] / base_loss:.0f}" for r in runs.values())
    left = ", ".join(f"{r['noise_left']['6']:.0f} at epsilon {k}" for k, r in runs.items())
    chance = 1 / 8  # the evaluator tells eight styles apart (plain included)
    sentences = [
        "Round 1 is the same with and without DP (devices train from scratch and are scored",
        "on their own adapter); from round 2 each device starts from its cluster's published,",
        f"noisy adapter. Final style accuracy: {base[-1]:.2f} without DP, {finals}",
        f"(a random guess among the evaluator's eight styles: {chance:.2f}); the final",
        f"held-out loss is {ratios} times the baseline's. With 6 devices per cluster the noise",
        f"left in a cluster adapter, in clip norms, is {left}, against a signal of at most one:",
        "the published adapters are noise, and the devices' few local steps (4 a round) cannot",
        "recover from them. Central DP at these epsilons needs clusters of about a thousand",
        "devices or more (the noise falls as 1/n: about one clip norm at n = 1,000 for epsilon",
        "8), or more local training between rounds. Devices here upload their whole adapter",
        "(start plus training), so the clip bounds the whole adapter and each round's noise is",
        "carried into the next; DP-FedAvg clips the round's delta instead, which this protocol",
        "does not have.",
    ]
    text = " ".join(sentences)
    return ["## Reading", "", text]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = _curve(report["baseline"], "style_accuracy")
    ax.plot(range(1, len(base) + 1), base, marker="o", label="no DP")
    for key, run in report.get("runs", {}).items():
        acc = _curve(run, "style_accuracy")
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"epsilon {key}")
    ax.set_xlabel("round")
    ax.set_ylabel("style accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Central DP per cluster, RESULTS protocol, seed {report['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
