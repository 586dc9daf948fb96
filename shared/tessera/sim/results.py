"""The method's evidence: every federation method on the same population, over several seeds.

    python -m tessera.sim.results --out docs

Runs each method (cluster-aware exact and fedavg, global FedAvg, local only, cluster-aware with
knowledge interaction off) for every seed on a fresh stack, with the same devices, data and
budget per device, and writes docs/RESULTS.md, results.json and results.png. Each finished
run is kept under `--runs` (docs/results-runs/, committed) and reused while its configuration
is unchanged, so an interrupted command picks up where it stopped. `--with NAME` adds a method
that is run only when asked (`cluster-aware secure`: secure aggregation, B trained on a frozen
A; bench/secure_utility.py --results compares it with exact aggregation).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from tessera.sim.results_page import TARGET, markdown, plot
from tessera.sim.run import SimConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "cluster-aware exact": {"method": "exact"},
    "cluster-aware fedavg": {"method": "fedavg"},
    "global FedAvg": {"method": "global"},
    "local only": {"method": "local"},
    "cluster-aware exact, lam 0": {"method": "exact", "lam": 0.0},
}
# Run only when asked (`--with`): secure rounds have no knowledge interaction (lam 0).
MORE_VARIANTS: dict[str, dict[str, Any]] = {
    "cluster-aware secure": {"method": "secure", "lam": 0.0},
}
RESULTS_CONFIG = SimConfig(
    devices=24,
    styles=4,
    # texture, stroke, palette, palette and fill; the hybrid is the first two (they combine)
    style_names=("stripes", "outline", "gradient", "pastel"),
    rounds=8,
    steps=4,  # the demo's per-device budget: few steps, few images, so that sharing matters
    batch_size=4,
    lr=5e-3,
    samples=8,
    eval_images=3,
    eval_steps=12,
    hybrid_images=16,
    workers=2,
)
METRICS = (
    "heldout_loss",
    "style_accuracy",
    "hybrid",
    "bytes_up_per_device",
    "bytes_down_per_device",
)


def measured_with(model: str) -> dict[str, str]:
    """What a run's numbers depend on beyond its configuration: the base model's weights and
    the evaluator's (`model` empty: the configured base model)."""
    from tessera.config import get_settings
    from tessera.data.evaluator import DEFAULT_EVALUATOR_PATH, WEIGHTS_FILE
    from tessera.model.facts import load_facts

    weights = (DEFAULT_EVALUATOR_PATH / WEIGHTS_FILE).read_bytes()
    return {
        "base": load_facts(model or get_settings().base_model).fingerprint,
        "evaluator": hashlib.sha256(weights).hexdigest(),
    }


def run_file(runs: Path, name: str, variant: SimConfig) -> Path:
    """Where a finished run of `variant` is kept: named by variant and seed, and by a digest of
    its whole configuration, base model and evaluator, so a run made under other settings or
    with other weights is never reused."""
    keyed = {"config": asdict(variant), "measured_with": measured_with(variant.model)}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()
    slug = name.replace(" ", "_").replace(",", "")
    return runs / f"{slug}-seed{variant.seed}-{digest[:10]}.json"


def run_all(
    config: SimConfig,
    seeds: list[int],
    runs: Path,
    *,
    scratch: Path = Path(".tessera-results"),
    log: Any = print,
    variants: Mapping[str, dict[str, Any]] = VARIANTS,
) -> dict[str, Any]:
    """Every variant for every seed (finished runs reused from `runs`; stacks in `scratch`);
    the reports as dicts. A new run records its wall time and the load average at its end."""
    from tessera.sim.run import device_pool
    from tessera.sim.stack import run_on_fresh_stack

    runs.mkdir(parents=True, exist_ok=True)
    reports: dict[str, list[dict[str, Any]]] = {}
    with device_pool(config.workers) as pool:
        for name, change in variants.items():
            for seed in seeds:
                variant = replace(config, seed=seed, **change)
                saved = run_file(runs, name, variant)
                if not saved.exists():
                    log(f"== {name}, seed {seed}")
                    started = time.perf_counter()
                    report = run_on_fresh_stack(variant, scratch, log=log, pool=pool)
                    data = report.to_dict()
                    data["wall_seconds"] = round(time.perf_counter() - started, 1)
                    data["load_average"] = [round(load, 2) for load in os.getloadavg()]
                    saved.write_text(json.dumps(data, indent=2) + "\n")
                reports.setdefault(name, []).append(json.loads(saved.read_text()))
    shutil.rmtree(scratch, ignore_errors=True)
    return reports


def _value(round_: dict[str, Any], metric: str) -> float:
    if metric == "hybrid":
        hybrid = round_.get("hybrid")
        return float("nan") if hybrid is None else float(hybrid["carries_both"])
    return float(round_[metric])


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and std over seeds of the values measured (NaN where none was)."""
    measured = [v for v in values if not np.isnan(v)]
    if not measured:
        return float("nan"), float("nan")
    return float(np.mean(measured)), float(np.std(measured))


def summarise(reports: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: mean and spread (std over seeds) of every metric per round, and the
    headline (rounds to the target style accuracy per seed, final values)."""
    summary: dict[str, Any] = {}
    for name, runs in reports.items():
        rounds = len(runs[0]["rounds"])
        per_round: dict[str, dict[str, list[float]]] = {}
        for metric in METRICS:
            spreads = [
                _spread([_value(r["rounds"][i], metric) for r in runs]) for i in range(rounds)
            ]
            per_round[metric] = {"mean": [m for m, _ in spreads], "std": [sd for _, sd in spreads]}
        to_target = [
            next((r["round"] for r in run["rounds"] if r["style_accuracy"] >= TARGET), None)
            for run in runs
        ]
        summary[name] = {
            "seeds": [run["config"]["seed"] for run in runs],
            "ari": [run["ari"] for run in runs],
            "per_round": per_round,
            "rounds_to_target": to_target,
            "mean_accuracy": [
                float(np.mean([r["style_accuracy"] for r in run["rounds"]])) for run in runs
            ],
            "final": {m: per_round[m]["mean"][-1] for m in METRICS},
            "final_std": {m: per_round[m]["std"][-1] for m in METRICS},
            "wall_seconds": [run.get("wall_seconds") for run in runs],
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path("docs/results-runs"),
        help="finished runs, one JSON each, kept (and committed) so that they are reused",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=RESULTS_CONFIG.rounds)
    parser.add_argument("--devices", type=int, default=RESULTS_CONFIG.devices)
    parser.add_argument(
        "--with",
        dest="more",
        action="append",
        default=[],
        choices=sorted(MORE_VARIANTS),
        help="also run this method and put it on the page (repeatable)",
    )
    args = parser.parse_args(argv)
    config = replace(RESULTS_CONFIG, rounds=args.rounds, devices=args.devices)
    variants = {**VARIANTS, **{name: MORE_VARIANTS[name] for name in args.more}}
    reports = run_all(config, args.seeds, args.runs, variants=variants)
    summary = summarise(reports)
    command = "python -m tessera.sim.results --out docs" + (
        "" if args.seeds == [0, 1, 2] else f" --seeds {' '.join(map(str, args.seeds))}"
    )
    if args.rounds != RESULTS_CONFIG.rounds:
        command += f" --rounds {args.rounds}"
    if args.devices != RESULTS_CONFIG.devices:
        command += f" --devices {args.devices}"
    command += "".join(f" --with '{name}'" for name in args.more)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(summary, args.out / "results.png")
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    page = markdown(summary, config, args.seeds, command, cases=args.out / "clustering_cases.json")
    (args.out / "RESULTS.md").write_text(page)
    print((args.out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
