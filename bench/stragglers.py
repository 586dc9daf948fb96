"""Stragglers: synchronous rounds against buffered asynchronous mode, with the same slow devices.

    python bench/stragglers.py --out docs

One federation (the bundled tiny model; `--devices` devices over `--styles` styles, the first
`--slow` of them `--factor` times slower, `--steps` training steps per local round) runs twice,
each time on a fresh embedded stack through the simulator (`tessera simulate`): `--rounds` sync
rounds, each waiting for every device, then one buffered round (`--mode buffered`), in which
each cluster publishes a version every `--buffer-k` updates and a device trains again from its
cluster's newest version as soon as it has sent an update; the buffered round ends after
rounds x devices / buffer-k versions, the same number of device updates as the sync rounds
(`--staleness-exponent`: its discount of stale updates, default 0: off).

Afterwards every published cluster adapter is scored the same way: at each publication, each
device's held-out denoising loss (`--eval-images` images of its own distribution that it never
trained on, fixed noise) with its cluster's newest adapter; the federation's loss is their
mean. The target, fixed before running: the mean held-out loss goes TARGET_SHARE of the way
from the base model's (no adapter) to the loss the sync rounds end with. Reported per mode: the
wall time from the first round's opening to the target and to the last version, and the cluster
versions published by then (in sync mode, one per cluster per round).
Writes docs/bench_stragglers.md, .json and .png (`--name`: another name).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from benchlib import common_arguments, machine, write_report

from tessera.data import make_device, to_tensor
from tessera.lora import LoraAdapter, adapter_from_bytes
from tessera.lora.train import denoising_loss
from tessera.model.base import BaseModel, load_base_model
from tessera.sim import Buffering, SimConfig, SimReport, Stragglers
from tessera.sim.stack import run_on_fresh_stack

TARGET_SHARE = 0.8  # of the way from the base model's held-out loss to the sync rounds' last
MODES = ("sync", "buffered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--styles", type=int, default=2)
    parser.add_argument("--slow", type=int, default=2, help="slow devices (the first enrolled)")
    parser.add_argument("--factor", type=float, default=4.0, help="how much slower they train")
    parser.add_argument("--rounds", type=int, default=3, help="sync rounds")
    parser.add_argument("--buffer-k", type=int, default=2)
    parser.add_argument(
        "--staleness-exponent",
        type=float,
        default=0.0,
        help="the buffered round's staleness_exponent (0: stale updates weigh as fresh ones)",
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="bench_stragglers", help="the report's file name")
    args = parser.parse_args()
    name = args.name
    if args.report_only:
        report = json.loads((args.out / f"{name}.json").read_text())
    else:
        report = measure(args)
    write_report(report, args.out, name, markdown=markdown, plot=plot)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = SimConfig(
        devices=args.devices,
        styles=args.styles,
        rounds=args.rounds,
        method="exact",
        steps=args.steps,
        batch_size=args.batch_size,
        samples=args.samples,
        eval_images=2,  # the devices' own per-round scores; the bench scores the versions
        eval_steps=2,
        workers=args.workers,
        seed=args.seed,
    )
    stragglers = Stragglers(devices=args.slow, factor=args.factor)
    base = load_base_model()
    heldout = HeldOut(base, config, args.eval_images)
    runs: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="tessera-stragglers-"))
    try:
        for mode in MODES:
            buffered = mode == "buffered"
            buffering = Buffering(k=args.buffer_k) if buffered else None
            options = {"staleness_exponent": args.staleness_exponent} if buffered else {}
            published: dict[str, Any] = {}

            def scored(info: Any, report: SimReport, published: dict[str, Any] = published) -> None:
                published.update(read_versions(info.urls["aggregator"], info.operator_token, base))

            started = time.perf_counter()
            report = run_on_fresh_stack(
                config,
                work / mode,
                log=lambda line: print(line, flush=True),
                after=scored,
                round_options=options,
                stragglers=stragglers,
                buffering=buffering,
            )
            runs[mode] = {
                "sim_seconds": time.perf_counter() - started,
                "local_rounds": len(report.rounds),  # sync: rounds; buffered: the most a device did
                "timeline": heldout.timeline(report, published),
            }
            print(f"{mode}: {len(runs[mode]['timeline']) - 1} versions scored", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_loss = runs["sync"]["timeline"][0]["loss"]
    sync_last = runs["sync"]["timeline"][-1]["loss"]
    target = base_loss - TARGET_SHARE * (base_loss - sync_last)
    for run in runs.values():
        run.update(reached(run["timeline"], target))
    return {
        "machine": machine(args.threads),
        "command": "python bench/stragglers.py " + " ".join(sys.argv[1:]),
        "config": {**vars(args), "out": str(args.out)},
        "target_share": TARGET_SHARE,
        "base_loss": base_loss,
        "target_loss": target,
        "runs": runs,
    }


class HeldOut:
    """Each device's held-out images and captions, scored with an adapter (cached by version)."""

    def __init__(self, base: BaseModel, config: SimConfig, images: int):
        self.base = base
        self.seed = config.seed
        styles = config.chosen_styles()
        self.sets = []
        for i in range(config.devices):  # the simulator's enrolment order
            profile = make_device(styles[i % len(styles)], i // len(styles), config.seed)
            batch = profile.heldout(images, seed=config.seed)
            self.sets.append((to_tensor(batch.images), base.prompts.encode(batch.captions)))

    def loss(self, device: int, adapter: LoraAdapter | None) -> float:
        images, captions = self.sets[device]
        return denoising_loss(self.base, images, captions, adapter, seed=self.seed)

    def timeline(self, report: SimReport, published: dict[str, Any]) -> list[dict[str, Any]]:
        """The mean held-out loss before any version, then after each cluster version."""
        clusters = [device["cluster"] for device in report.devices]
        losses = [self.loss(i, None) for i in range(len(clusters))]
        points = [{"seconds": 0.0, "versions": 0, "loss": statistics.fmean(losses)}]
        opened = published["opened_at"]
        for count, version in enumerate(published["versions"], start=1):
            for i, cluster in enumerate(clusters):
                if version["name"] == f"cluster:{cluster}":
                    losses[i] = self.loss(i, version["adapter"])
            points.append(
                {
                    "seconds": (version["created_at"] - opened).total_seconds(),
                    "versions": count,
                    "name": f"{version['name']} v{version['version']}",
                    "stale_updates": version["stale_updates"],
                    "loss": statistics.fmean(losses),
                }
            )
        return points


def read_versions(aggregator_url: str, token: str, base: BaseModel) -> dict[str, Any]:
    """When the first round opened, and every cluster version (oldest first) with its adapter."""
    headers = {"Authorization": f"Bearer {token}"}
    versions = []
    with httpx.Client(base_url=aggregator_url, timeout=60, headers=headers) as http:
        rounds = http.get("/v1/rounds").raise_for_status().json()
        opened = min(datetime.fromisoformat(r["opened_at"]) for r in rounds)
        for version_id in range(1, 100_000):  # a fresh stack: ids count from 1
            answer = http.get(f"/v1/adapter-versions/{version_id}")
            if answer.status_code == 404:
                break
            body = answer.raise_for_status().json()
            if not body["name"].startswith("cluster:"):
                continue
            data = httpx.get(body["download_url"], timeout=60).raise_for_status().content
            versions.append(
                {
                    "name": body["name"],
                    "version": body["version"],
                    "created_at": datetime.fromisoformat(body["created_at"]),
                    "stale_updates": body["metrics"].get("stale_updates", 0),
                    "adapter": adapter_from_bytes(data, base.lora_spec),
                }
            )
    versions.sort(key=lambda v: v["created_at"])
    return {"opened_at": opened, "versions": versions}


def reached(timeline: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """When the timeline first reaches the target loss, and where it ends."""
    hit = next((p for p in timeline if p["loss"] <= target), None)
    last = timeline[-1]
    return {
        "seconds_to_target": None if hit is None else hit["seconds"],
        "versions_to_target": None if hit is None else hit["versions"],
        "final_loss": last["loss"],
        "final_seconds": last["seconds"],
        "final_versions": last["versions"],
    }


def _cell(value: float | None, digits: int = 0) -> str:
    return "not reached" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        "# Stragglers: synchronous rounds against buffered asynchronous mode",
        "",
        f"`{report['command']}`",
        "",
        f"{config['devices']} devices over {config['styles']} styles (the bundled tiny model), "
        f"the first {config['slow']} training {config['factor']:g}x as slowly; "
        f"{config['steps']} steps per local round; {config['rounds']} sync rounds against one "
        f"buffered round with buffer_k {config['buffer_k']} and as many device updates. "
        "Each published cluster version is scored on every device's held-out images "
        "(denoising loss with its cluster's newest adapter, mean over devices).",
        "",
        f"Target, fixed before running: {report['target_share']:.0%} of the way from the base "
        f"model's held-out loss ({report['base_loss']:.4f}) to the sync rounds' last "
        f"({report['runs']['sync']['final_loss']:.4f}): **{report['target_loss']:.4f}**.",
        "",
        "| mode | versions to target | seconds to target | versions in all | seconds to the "
        "last version | final held-out loss | lowest (at seconds) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, run in report["runs"].items():
        best = min(run["timeline"], key=lambda point: point["loss"])
        lines.append(
            f"| {mode} | {_cell(run['versions_to_target'])} | "
            f"{_cell(run['seconds_to_target'], 1)} | {run['final_versions']} | "
            f"{run['final_seconds']:.1f} | {run['final_loss']:.4f} | "
            f"{best['loss']:.4f} ({best['seconds']:.1f}) |"
        )
    stale = {
        mode: sum(point.get("stale_updates", 0) for point in run["timeline"])
        for mode, run in report["runs"].items()
    }
    lines += [
        "",
        "Versions count cluster adapters (a sync round publishes one per cluster); seconds run "
        "from the first round's opening to the version's publication. Updates trained from an "
        f"older version than their cluster's newest: sync {stale['sync']}, buffered "
        f"{stale['buffered']} (the buffered round's staleness_exponent: "
        f"{config.get('staleness_exponent', 0.0):g}; 0 weighs them as fresh ones). A buffered "
        "version averages only buffer_k updates, so the last one may end above the lowest.",
        "",
        f"Measured on {report['machine']}.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for mode, run in report["runs"].items():
        points = run["timeline"]
        axis.step(
            [p["seconds"] for p in points],
            [p["loss"] for p in points],
            where="post",
            marker="o",
            markersize=3,
            label=mode,
        )
    axis.axhline(report["target_loss"], color="grey", linestyle="--", label="target")
    axis.set_xlabel("seconds since the first round opened")
    axis.set_ylabel("mean held-out denoising loss")
    axis.set_title("Sync rounds vs buffered mode with slow devices")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
