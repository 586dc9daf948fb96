"""Aggregation at real size: N LoRA updates of SD-1.5 / SDXL attention shapes, each method alone.

    python bench/aggregation_scale.py --out docs [--models sd15 sdxl] [--ranks 4 16]
        [--counts 10 100 1000] [--max-resident-gb 7] [--dense-max 10] [--dense-ranks 4 16]
        [--streamed-max 100] [--streamed-max-gb 4] [--streamed-models sd15 sdxl]
    python bench/aggregation_scale.py --out docs --report-only [--notes reading.md]

For every model, rank and N, each method runs in a fresh process of its own, on the same N
synthetic updates, and reports its wall time and the process's peak resident set (Linux
VmHWM, reset once the inputs are built, so it is the peak with the inputs resident). Two
kinds of updates, both seeded, weights 1..5:

- flat: Gaussian factors (std 0.02): the mean has a flat spectrum, the worst case for any
  truncation (its r-th and (r+1)-th singular values nearly tie, so which rank-r subspace is
  "best" is ill-conditioned); every method's timing is measured on these;
- cluster: what a cluster's updates look like, a shared update (Gaussian factors) plus half as
  much of each device's own: exact and the dense reference only, for the accuracy columns.

Methods:

- floor: the weighted sum of the factors tensor by tensor, in place (what any mean costs);
- flower: Flower's `flwr.server.strategy.aggregate.aggregate` on the same tensors as NumPy
  arrays (per-tensor weighted mean: inexact for LoRA, mean(B)mean(A) != mean(BA));
- fedavg: Tessera's `aggregate_fedavg` (the same per-tensor mean, the generic-FL baseline);
- exact: Tessera's `aggregate_exact` (streamed, never forms a dense product);
- dense: `aggregate_exact_dense`, the reference that forms every product and runs a full SVD
  (N <= --dense-max, ranks --dense-ranks: on a small machine its 93.5M-value products and
  1280 x 1280 SVDs take minutes); its process also reads the exact result back and reports
  the metrics below;
- streamed: the worker's own path, `aggregate_plan` (scope global, exact), reading every
  update from the embedded SeaweedFS (sha256 checked, parsed) a few ahead in threads
  (N <= --streamed-max, models --streamed-models; the upload before it is not timed).

Metrics of exact against the dense reference X_dense (M the true weighted mean of the
products, X = exact's rank-r result, all modules together, Frobenius norms):
- relative error ||X - X_dense|| / ||X_dense||: how far the two truncations are apart;
- residual ratio ||M - X|| / ||M - X_dense||: 1 = as close to M as the best rank-r
  truncation (Eckart-Young); on a flat spectrum the fairer measure, since many rank-r
  truncations are almost equally good there while far apart from each other;
- energy kept: the share of M's squared singular values the rank-r result keeps (exact's own
  report, estimated from probe columns when sketched; the dense one's exact).

Inputs that would not fit `--max-resident-gb` are skipped for the in-memory methods and
noted. Module shapes are hard-coded from diffusers' UNet configs (`attention_shapes`).
Writes docs/bench_aggregation.md, .json and .png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from benchlib import common_arguments, machine, reset_peak, status_bytes, write_report

from tessera.lora import LoraSpec, adapter_from_bytes, adapter_to_bytes
from tessera.lora.adapter import LoraAdapter, random_adapter
from tessera.lora.aggregate import WeightedUpdate, aggregate_exact, aggregate_fedavg

NAME = "bench_aggregation"
METHODS = ("floor", "flower", "fedavg", "exact", "dense", "streamed")
IN_MEMORY = ("floor", "flower", "fedavg", "exact", "dense")

# (block prefix, width, attentions, transformer layers each): diffusers' UNet2DConditionModel
# configs of SD-1.5 (cross-attention 768) and SDXL base (cross-attention 2048).
_BLOCKS = {
    "sd15": (
        768,
        [
            ("down_blocks.0", 320, 2, 1),
            ("down_blocks.1", 640, 2, 1),
            ("down_blocks.2", 1280, 2, 1),
            ("mid_block", 1280, 1, 1),
            ("up_blocks.1", 1280, 3, 1),
            ("up_blocks.2", 640, 3, 1),
            ("up_blocks.3", 320, 3, 1),
        ],
    ),
    "tiny": (64, [("down_blocks.0", 32, 1, 1), ("up_blocks.1", 48, 1, 1)]),  # tests only
    "sdxl": (
        2048,
        [
            ("down_blocks.1", 640, 2, 2),
            ("down_blocks.2", 1280, 2, 10),
            ("mid_block", 1280, 1, 10),
            ("up_blocks.0", 1280, 3, 10),
            ("up_blocks.1", 640, 3, 2),
        ],
    ),
}


def attention_shapes(model: str) -> dict[str, tuple[int, int]]:
    """The (out, in) of every attention projection (to_q/k/v/out.0 of attn1 and attn2)."""
    cross, blocks = _BLOCKS[model]
    shapes: dict[str, tuple[int, int]] = {}
    for prefix, width, attentions, depth in blocks:
        for a in range(attentions):
            for t in range(depth):
                base = f"{prefix}.attentions.{a}.transformer_blocks.{t}"
                for attn, kv in (("attn1", width), ("attn2", cross)):
                    shapes[f"{base}.{attn}.to_q"] = (width, width)
                    shapes[f"{base}.{attn}.to_k"] = (width, kv)
                    shapes[f"{base}.{attn}.to_v"] = (width, kv)
                    shapes[f"{base}.{attn}.to_out.0"] = (width, width)
    return shapes


def spec(model: str) -> LoraSpec:
    return LoraSpec(
        base_model_id=f"bench/{model}", base_model_hash=model, modules=attention_shapes(model)
    )


def update_bytes(model: str, rank: int) -> int:
    return 4 * rank * sum(out + inner for out, inner in attention_shapes(model).values())


KINDS = ("flat", "cluster")


def make_update(model_spec: LoraSpec, rank: int, index: int, kind: str = "flat") -> WeightedUpdate:
    """Update `index` of a kind: Gaussian factors (flat), or a shared update plus half as much
    of the device's own (cluster)."""
    own = random_adapter(model_spec, rank, float(rank), seed=index)
    if kind == "cluster":
        shared = random_adapter(model_spec, rank, float(rank), seed=10**6)
        tensors = {key: shared.tensors[key] + 0.5 * own.tensors[key] for key in own.tensors}
        own = replace(own, tensors=tensors)
    return WeightedUpdate(own, float(1 + index % 5))


# -- one method in this process ------------------------------------------------------------------


def floor(updates: list[WeightedUpdate]) -> dict[str, torch.Tensor]:
    """The weighted sum of every factor, in place: the least any mean of the updates costs."""
    total = sum(u.weight for u in updates)
    sums = {k: v * updates[0].weight for k, v in updates[0].adapter.tensors.items()}
    for update in updates[1:]:
        for key, value in update.adapter.tensors.items():
            sums[key].add_(value, alpha=update.weight)
    return {k: v.div_(total) for k, v in sums.items()}


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """Build the inputs, reset the peak, run one method, return time, peak and notes."""
    torch.set_num_threads(job["threads"])
    model, rank, count, method = job["model"], job["rank"], job["count"], job["method"]
    model_spec = spec(model)
    if method == "streamed":
        return _streamed(job, model_spec)
    if method == "sweep":
        return _sweep(job, model_spec)
    updates = [make_update(model_spec, rank, i, job["kind"]) for i in range(count)]
    call: Callable[[], Any]
    if method == "floor":
        call = lambda: floor(updates)  # noqa: E731
    elif method == "flower":
        from flwr.server.strategy.aggregate import aggregate

        arrays = [([t.numpy() for t in u.adapter.tensors.values()], int(u.weight)) for u in updates]
        call = lambda: aggregate(arrays)  # noqa: E731
    elif method == "fedavg":
        call = lambda: aggregate_fedavg(updates, rank=rank)  # noqa: E731
    elif method == "exact":
        call = lambda: aggregate_exact(updates, rank=rank)  # noqa: E731
    else:
        from tessera.lora.aggregate_dense import dense_means, truncate_means

        means: dict[str, torch.Tensor] = {}

        def call() -> Any:
            means.update(dense_means(updates))
            return truncate_means(means, updates[0].adapter, count=count, rank=rank, alpha=None)

    inputs = status_bytes("VmRSS")
    reset_peak()
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "seconds": seconds,
        "peak_bytes": status_bytes("VmHWM"),
        "inputs_bytes": inputs,
    }
    if method == "exact":
        row["energy_kept"] = result.energy_kept
        row["sketched"] = result.sketched
        exact_bytes = adapter_to_bytes(result.adapter, dtype="float32")  # not fp16: compared
        Path(job["exact_file"]).write_bytes(exact_bytes)
    if method == "dense":
        from tessera.lora.aggregate_dense import relative_error, residual_ratio

        row["energy_kept"] = result.energy_kept
        exact_file = Path(job["exact_file"])
        if exact_file.exists():
            exact = adapter_from_bytes(exact_file.read_bytes())
            row["exact_relative_error"] = relative_error(exact, result.adapter)
            row["exact_residual_ratio"] = residual_ratio(exact, result.adapter, means)
    return row


SWEEP = ((4, 1), (4, 0), (4, 3), (16, 1), (16, 3), (16, 7))
"""(oversample, power passes) of the accuracy sweep; the first is `aggregate_exact`'s default."""


def _singular(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Each module's singular values of an exact result (B = U sqrt(S/scale), A likewise)."""
    return {
        m: adapter.scale * b.double().norm(dim=0) * a.double().norm(dim=1)
        for m, (a, b) in ((m, adapter.flat_pair(m)) for m in adapter.modules)
    }


def _sweep(job: dict[str, Any], model_spec: LoraSpec) -> dict[str, Any]:
    """The sketch against the exact truncation of the same updates (the stacked path at any
    summed rank: exact, and seconds here instead of the dense reference's minutes), for each
    (oversample, power passes) of `SWEEP`: time of the call, relative error, the share of the
    best truncation's energy it keeps and the residual ratio. Both sketch results are
    orthogonal projections of M (onto Q's columns, or P's rows), so ||M - X||^2 = ||M||^2 -
    ||X||^2 and the residual ratio needs no dense M. Also the spectral gap sigma_r / sigma_r+1
    (median over modules), which says whether the best truncation is well defined at all."""
    from tessera.lora.aggregate_dense import relative_error
    from tessera.lora.bounds import update_norm
    from tessera.lora.lowrank import SketchOptions

    rank, count = job["rank"], job["count"]
    updates = [make_update(model_spec, rank, i, job["kind"]) for i in range(count)]
    exact = SketchOptions(exact_rank=10**9)
    best = aggregate_exact(updates, rank=rank, options=exact)
    wider = _singular(aggregate_exact(updates, rank=rank + 1, options=exact).adapter)
    gaps = sorted(float(s[rank - 1] / s[rank]) for s in wider.values())
    best_energy = update_norm(best.adapter) ** 2
    total = best_energy / best.energy_kept
    rows = []
    for oversample, passes in SWEEP:
        options = SketchOptions(oversample=oversample, power_passes=passes, exact_rank=0)
        start = time.perf_counter()
        result = aggregate_exact(updates, rank=rank, options=options)
        seconds = time.perf_counter() - start
        energy = update_norm(result.adapter) ** 2
        rows.append(
            {
                "oversample": oversample,
                "power_passes": passes,
                "seconds": seconds,
                "relative_error": relative_error(result.adapter, best.adapter),
                "energy_of_best": energy / best_energy,
                "residual_ratio": ((total - energy) / (total - best_energy)) ** 0.5,
            }
        )
    return {"gap_median": gaps[len(gaps) // 2], "gap_min": gaps[0], "sweep": rows}


def _streamed(job: dict[str, Any], model_spec: LoraSpec) -> dict[str, Any]:
    """The worker's path from the embedded object store: upload (untimed), then aggregate."""
    from benchlib import embedded_backends

    from services.worker.aggregation import RoundPlan, UpdateRef, aggregate_plan
    from tessera.federation import RoundConfig, update_key
    from tessera.lora.bounds import ScaleRange  # the settings' defaults, as the worker uses

    rank, count = job["rank"], job["count"]
    with tempfile.TemporaryDirectory() as scratch, embedded_backends(Path(scratch)) as (_, store):
        refs = []
        for i in range(count):
            update = make_update(model_spec, rank, i)
            data = adapter_to_bytes(update.adapter)
            stored = store.put_bytes(update_key(1, i, hashlib.sha256(data).hexdigest()), data)
            refs.append(UpdateRef(i, i, stored.key, stored.sha256, int(update.weight), None))
            del update
        plan = RoundPlan(
            round_id=1,
            config=RoundConfig(scope="global", method="exact", rank=rank, lam=0.0),
            opened_at=datetime.now(UTC),
            clustering_id=None,
            groups={None: refs},
            centroids={},
        )
        inputs = status_bytes("VmRSS")
        reset_peak()
        start = time.perf_counter()
        outcome = aggregate_plan(plan, store=store, scales=ScaleRange(1e-3, 16.0))
        seconds = time.perf_counter() - start
        peak = status_bytes("VmHWM")
    assert len(outcome.used) == count and not outcome.excluded
    return {"seconds": seconds, "peak_bytes": peak, "inputs_bytes": inputs}


# -- the parent: one process per cell ------------------------------------------------------------


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (model, rank, N, method) to run, in order (exact before dense: dense reads it)."""
    jobs = []
    budget = args.max_resident_gb * 1e9
    for model in args.models:
        for rank in args.ranks:
            for count in args.counts:
                resident = update_bytes(model, rank) * count
                for kind, method in [("flat", m) for m in args.methods] + [
                    ("cluster", m) for m in ("exact", "dense") if m in args.methods
                ]:
                    skip = None
                    copies = 2 if method == "flower" else 1  # Flower copies every weighted tensor
                    if method in IN_MEMORY and resident * copies > budget:
                        skip = f"inputs need {resident * copies / 1e9:.1f} GB resident"
                    dense_bytes = 8 * sum(o * i for o, i in attention_shapes(model).values())
                    if method == "dense" and (
                        count > args.dense_max or rank not in args.dense_ranks
                    ):
                        ranks = " and ".join(map(str, args.dense_ranks))
                        skip = f"dense reference only for N <= {args.dense_max}, rank {ranks}"
                    elif method == "dense" and dense_bytes > budget:
                        skip = f"dense sums need {dense_bytes / 1e9:.1f} GB"
                    if method == "streamed" and count > args.streamed_max:
                        skip = f"streamed only for N <= {args.streamed_max}"
                    elif method == "streamed" and resident > args.streamed_max_gb * 1e9:
                        skip = f"streamed only up to {args.streamed_max_gb:g} GB of uploads"
                    if method == "streamed" and model not in args.streamed_models:
                        skip = f"streamed only for {' and '.join(args.streamed_models)}"
                    jobs.append(
                        {
                            "model": model,
                            "rank": rank,
                            "count": count,
                            "method": method,
                            "kind": kind,
                            "skip": skip,
                        }
                    )
    if args.sweep_count:
        model = "sd15" if "sd15" in args.models else args.models[0]
        for kind in KINDS:
            jobs.append(
                {
                    "model": model,
                    "rank": args.ranks[0],
                    "count": args.sweep_count,
                    "method": "sweep",
                    "kind": kind,
                    "skip": None,
                }
            )
    return jobs


def run_all(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell, the dense references beyond N = 10 last (the longest, and optional); the
    JSON is rewritten after each, so a run stopped early still reports (--report-only)."""
    rows: list[dict[str, Any]] = []
    jobs = sorted(cells(args), key=lambda job: job["method"] == "dense" and job["count"] > 10)
    with tempfile.TemporaryDirectory() as scratch:
        for job in jobs:
            job["threads"] = args.threads
            name = f"{job['model']}-{job['rank']}-{job['count']}-{job['kind']}.safetensors"
            job["exact_file"] = str(Path(scratch) / name)
            row = {k: job[k] for k in ("model", "rank", "count", "method", "kind", "skip")}
            if job["skip"] is None:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(job)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    row["skip"] = f"failed: {done.stderr.strip().splitlines()[-1:]}"
                else:
                    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            partial = {**report, "rows": rows, "machine": machine(args.threads)}
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{NAME}.json").write_text(json.dumps(partial, indent=1))
    return rows


# -- reporting -----------------------------------------------------------------------------------


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row.get("skip"):
        return "skipped"
    return f"{row['seconds']:.2f} s, {row['peak_bytes'] / 1e9:.2f} GB"


HEADER = (
    "| N | inputs | floor | Flower `aggregate` | Tessera fedavg | Tessera exact "
    "| dense reference | worker streamed from S3 "
    "| flat: rel. error / residual ratio / energy kept (exact, dense) "
    "| cluster: rel. error / residual ratio / energy kept (exact, dense) |"
)


def _accuracy(exact: dict[str, Any] | None, dense: dict[str, Any] | None) -> str:
    """rel. error / residual ratio / energy kept (exact, dense) of one kind, as far as run."""
    if exact is None or "energy_kept" not in exact:
        return "-"
    energy = f"{exact['energy_kept']:.4f}"
    if dense is None or "exact_relative_error" not in dense:
        mode = "sketched" if exact.get("sketched") else "exact path"
        return f"no dense reference / {energy} ({mode})"
    return (
        f"{dense['exact_relative_error']:.1e} / {dense['exact_residual_ratio']:.6f} / "
        f"{energy}, {dense['energy_kept']:.4f}"
    )


def _table_row(count: int, get: Callable[[str, str], dict[str, Any] | None]) -> str:
    exact = get("exact", "flat")
    resident = exact.get("inputs_bytes") if exact else None
    cells = [
        str(count),
        f"{resident / 1e9:.2f} GB" if resident else "-",
        *(_cell(get(m, "flat")) for m in ("floor", "flower", "fedavg", "exact", "dense")),
        _cell(get("streamed", "flat")),
        *(_accuracy(get("exact", kind), get("dense", kind)) for kind in KINDS),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    index = {
        (r["model"], r["rank"], r["count"], r["method"], r.get("kind", "flat")): r for r in rows
    }
    lines = [
        "# Aggregation at real size (`make bench`: bench/aggregation_scale.py)",
        "",
        f"Measured on this machine: {report['machine']} (at the start "
        f"{report.get('load_at_start', '?')}); torch {report['torch']}. Each cell is "
        "one method in its own process: wall time of one call, and the process's peak resident "
        "set with the inputs resident (the inputs alone are the `inputs` column). Timings on "
        "flat updates (Gaussian factors, weights 1..5); accuracy on flat and on cluster-like "
        "updates (a shared update plus half as much of each device's own). Exact is "
        f"`aggregate_exact` with its defaults ({report['sketch']}). Accuracy metrics against "
        "the dense truncated SVD of the true mean M: relative error ||X - X_dense|| / "
        "||X_dense||, residual ratio ||M - X|| / ||M - X_dense|| (1 = as good as the best "
        "rank-r truncation), energy kept (share of M's squared singular values kept; exact's is "
        "estimated when sketched).",
        "",
    ]
    for model in report["models"]:
        for rank in report["ranks"]:
            size = update_bytes(model, rank)
            modules = len(attention_shapes(model))
            lines += [
                f"## {model.upper()} attention, rank {rank} ({modules} modules, "
                f"{size / 1e6:.2f} MB per update)",
                "",
                HEADER,
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for count in report["counts"]:
                key = (model, rank, count)
                lines.append(_table_row(count, lambda m, kind, k=key: index.get((*k, m, kind))))
            lines.append("")
    lines += _sweep_table(rows)
    if report.get("notes"):
        lines += ["## Reading", "", *report["notes"], ""]
    skipped = sorted({r["skip"] for r in rows if r.get("skip")})
    if skipped:
        lines += ["Skipped cells: " + "; ".join(skipped) + ".", ""]
    lines += [f"![time against N]({NAME}.png)", ""]
    return "\n".join(lines)


def _sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    """The sketch's accuracy against its cost, per kind of update (empty without a sweep)."""
    sweeps = [r for r in rows if r["method"] == "sweep" and "sweep" in r]
    if not sweeps:
        return []
    first = sweeps[0]
    lines = [
        f"## The sketch's accuracy against its cost ({first['model'].upper()}, rank "
        f"{first['rank']}, N = {first['count']}, summed rank {first['rank'] * first['count']})",
        "",
        "Forced onto the sketch (`exact_rank=0`) and compared with the exact truncation of the "
        "same updates (the stacked path: exact at any summed rank, 9e-8 from the dense "
        "reference above). Time: one call in this process. Energy of the best: the share of the "
        "best rank-r truncation's energy the result keeps. Residual ratio: ||M - X|| / "
        "||M - X_best|| (both are projections of M, so it needs no dense M). Spectral gap: "
        "sigma_r / sigma_r+1 of M's modules (median, min): near 1, the best truncation is "
        "ill-conditioned and any sketch lands on another, almost as good one.",
        "",
        "| updates | spectral gap (median, min) | oversample, power passes | time | relative error "
        "| energy of the best | residual ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sweeps:
        gap = f"{row['gap_median']:.4f}, {row['gap_min']:.4f}"
        for i, cell in enumerate(row["sweep"]):
            default = " (default)" if i == 0 else ""
            lines.append(
                f"| {row['kind'] if i == 0 else ''} | {gap if i == 0 else ''} "
                f"| {cell['oversample']}, {cell['power_passes']}{default} "
                f"| {cell['seconds']:.2f} s | {cell['relative_error']:.1e} "
                f"| {cell['energy_of_best']:.4f} | {cell['residual_ratio']:.6f} |"
            )
    return [*lines, ""]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    combos = [(m, r) for m in report["models"] for r in report["ranks"]]
    figure, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.8), squeeze=False)
    for axis, (model, rank) in zip(axes[0], combos, strict=True):
        for index, (method, marker) in enumerate(zip(METHODS, "osv^Dx", strict=True)):
            points = [
                (r["count"], r["seconds"])
                for r in report["rows"]
                if (r["model"], r["rank"], r["method"]) == (model, rank, method)
                and r.get("kind", "flat") == "flat"
                and not r.get("skip")
            ]
            if points:
                axis.plot(
                    *zip(*points, strict=True), marker=marker, color=f"C{index}", label=method
                )
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="updates",
            ylabel="seconds",
            title=f"{model} rank {rank}",
        )
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=sorted(_BLOCKS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--counts", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-resident-gb", type=float, default=7.0)
    parser.add_argument("--dense-max", type=int, default=10)
    parser.add_argument("--dense-ranks", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--streamed-max", type=int, default=100)
    parser.add_argument(
        "--streamed-max-gb",
        type=float,
        default=4.0,
        help="skip streamed cells whose updates add up to more (they are uploaded first)",
    )
    parser.add_argument(
        "--streamed-models",
        nargs="+",
        default=sorted(_BLOCKS),
        choices=sorted(_BLOCKS),
        help="the models whose streamed cells run (default: every one of --models)",
    )
    parser.add_argument(
        "--sweep-count",
        type=int,
        default=100,
        help="N of the sketch's accuracy sweep (sd15, the first rank; 0: no sweep)",
    )
    parser.add_argument(
        "--notes", type=Path, help="with --report-only: the Reading section, paragraphs from a file"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    common_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    path = args.out / f"{NAME}.json"
    if args.report_only:
        report = json.loads(path.read_text())
        if args.notes:
            report["notes"] = args.notes.read_text().strip().split("\n\n")
        write_report(report, args.out, NAME, markdown=markdown, plot=plot)
        return
    from tessera.lora.lowrank import DEFAULT_SKETCH

    report = {
        "load_at_start": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "models": args.models,
        "ranks": args.ranks,
        "counts": args.counts,
        "sketch": f"oversample {DEFAULT_SKETCH.oversample}, power passes "
        f"{DEFAULT_SKETCH.power_passes}, exact up to summed rank {DEFAULT_SKETCH.exact_rank}",
    }
    report["rows"] = run_all(args, report)
    report["machine"] = machine(args.threads)
    write_report(report, args.out, NAME, markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
