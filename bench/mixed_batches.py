"""Mixed-adapter batches: queued 1-image jobs, each with its own 2-adapter mix, as one UNet batch.

    python bench/mixed_batches.py --out docs

On each model (the bundled tiny model, with its `full` LoRA preset: attention, feed-forward,
proj_in/out and the ResNet convolutions; and an SD-1.5-sized UNet with random weights, built by
`build_random_folder(..., "sd1", size="full", cond_width=768)`, with the same preset), `--jobs`
queued 1-image jobs (own prompt, own seed) run three ways, interleaved, after one warm-up each:

- *one by one*: each job alone under its own 2-adapter mix (`AdapterCache.mix`, unmerged, as a
  worker runs a job alone);
- *shared mix, one batch*: the jobs all under one 2-adapter mix, one UNet batch (the only
  batching there was before per-sample mixes);
- *mixed, one batch*: the jobs under `--jobs` different 2-adapter mixes, one UNet batch with a
  per-sample mix (`AdapterCache.batch_mix`, what the inference worker runs).

Every mix blends two different cached adapters (0.6/0.4) out of `--jobs` published ones, so the
mixed batch gathers 32 adapter pairs per layer. Each job's image in the mixed batch is compared
with the same job run alone: the largest absolute difference (images in [-1, 1]) is reported.

The adapters are random rank-8 ones (std 0.02) published through the worker's own publishing
code into a fresh embedded stack (SQLite, SeaweedFS) in a temporary folder, and read by an
`AdapterCache` as the worker reads them. On 2 CPU cores the SD-1.5-sized UNet runs at
`--sd-size` pixels (default 128: 16x16 latents; the weights and layer shapes are SD-1.5's, only
the spatial size is smaller) and `--sd-steps` steps, so that the run fits in minutes (at 128
pixels one 32-row UNet pass took about 90 s on one busy core; at 256, four times that). Writes
docs/bench_mixed_batches.md, .json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchlib import common_arguments, embedded_backends, machine, write_report
from inference_speed import publish_random

from services.inference.worker.cache import AdapterCache
from tessera.config import Settings
from tessera.lora.mixing import SampleWeights
from tessera.model.base import BaseModel, load_base_model
from tessera.model.conditioning import Conditioning
from tessera.model.generate import generate, seeded_latents
from tessera.model.synthetic import build_random_folder

NAME = "bench_mixed_batches"
BLEND = (0.6, 0.4)
TARGETS = "full"
GUIDANCE = 3.0
SPEEDUP_AIM = 1.5  # one mixed batch against the jobs one by one
SHARED_AIM = 0.8  # the mixed batch's speed relative to a batch sharing one mix
TOLERANCE = 1e-3  # largest difference of a job's image (in [-1, 1]), mixed batch against alone
# Per-image merged weights a batch may hold: TESSERA_INFERENCE_SAMPLE_MERGE_BYTES by default
SAMPLE_MERGE_BYTES = int(Settings.model_fields["inference_sample_merge_bytes"].default)


def sd15_base(folder: Path, size: int) -> BaseModel:
    """The random SD-1.5-sized model, drawing `size` pixels (its UNet is size-agnostic)."""
    if not (folder / "model_index.json").exists():
        started = time.perf_counter()
        build_random_folder(folder, "sd1", size="full", cond_width=768)
        print(f"built {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    base = load_base_model(folder, targets=TARGETS)
    latent = size // 8
    facts = dataclasses.replace(
        base.facts, resolution=size, sample_shape=(base.facts.sample_shape[0], latent, latent)
    )
    return dataclasses.replace(base, facts=facts)


def prompts_for(base: BaseModel, jobs: int) -> Conditioning:
    """One random prompt per job, at the model's conditioning width and length (the text
    encoder of a random folder is random too: its encodings would mean no more)."""
    generator = torch.Generator().manual_seed(7)
    facts = base.facts
    embeds = torch.randn(jobs, facts.cond_length, facts.cond_width, generator=generator)
    return Conditioning(embeds)


def bench_model(
    label: str, base: BaseModel, *, jobs: int, steps: int, repeats: int
) -> dict[str, Any]:
    """The three ways to run `jobs` queued jobs on `base`, and the mixed batch's accuracy."""
    prompts = prompts_for(base, jobs)
    noise = torch.cat([seeded_latents(base, 1, seed) for seed in range(jobs)])
    with (
        tempfile.TemporaryDirectory() as scratch,
        embedded_backends(Path(scratch) / "stack") as (sessions, store),
    ):
        started = time.perf_counter()
        ids, adapters = publish_random(sessions, store, base, jobs, first=0)
        print(f"{label}: published {jobs} adapters in {time.perf_counter() - started:.0f} s")
        cache = AdapterCache(
            base=base,
            sessions=sessions,
            store=store,
            max_bytes=1 << 40,
            sample_merge_bytes=SAMPLE_MERGE_BYTES,
        )
        mixes = [[(ids[j], BLEND[0]), (ids[(j + 1) % jobs], BLEND[1])] for j in range(jobs)]
        for version_id in ids:
            cache.get(version_id)  # every adapter cached, as in a warm worker

        def batch_mix(batch: list[list[tuple[int, float]]]) -> Any:
            """What the worker builds for each batch (timed with it): the UNet's mix."""
            _, active = cache.batch_mix(batch, [1] * jobs)
            return active

        def run_alone(job: int) -> torch.Tensor:
            one = prompts.rows(slice(job, job + 1))
            start = noise[job : job + 1]
            out = generate(
                base,
                one,
                steps=steps,
                guidance=GUIDANCE,
                start_latents=start,
                merged=cache.mix(mixes[job]).active,
            )
            assert out.images is not None
            return out.images

        def run_batch(batch: list[list[tuple[int, float]]]) -> torch.Tensor:
            out = generate(
                base,
                prompts,
                steps=steps,
                guidance=GUIDANCE,
                start_latents=noise,
                merged=batch_mix(batch),
            )
            assert out.images is not None
            return out.images

        runs: dict[str, Callable[[], object]] = {
            "one_by_one": lambda: [run_alone(job) for job in range(jobs)],
            "shared_batch": lambda: run_batch([mixes[0]] * jobs),
            "mixed_batch": lambda: run_batch(mixes),
        }
        warm = {
            "one_by_one": lambda: run_alone(0),
            "shared_batch": runs["shared_batch"],
            "mixed_batch": runs["mixed_batch"],
        }
        for name, fn in warm.items():
            started = time.perf_counter()
            fn()
            print(f"{label}: warm-up {name} {time.perf_counter() - started:.1f} s", flush=True)
        samples: dict[str, list[float]] = {name: [] for name in runs}
        alone_images: list[torch.Tensor] = []
        mixed_images = torch.empty(0)
        for repeat in range(repeats):  # interleaved, so drift in the load hits all three
            for name, fn in runs.items():
                started = time.perf_counter()
                result = fn()
                samples[name].append(time.perf_counter() - started)
                print(f"{label}: {name} {samples[name][-1]:.2f} s", flush=True)
                if repeat == 0 and name == "one_by_one":
                    alone_images = list(result)  # type: ignore[call-overload]
                if repeat == 0 and name == "mixed_batch":
                    mixed_images = result  # type: ignore[assignment]
        mixed = batch_mix(mixes)
        assert mixed is not None and mixed.samples == jobs and not mixed.terms
        stacked_bytes = mixed.nbytes
        merged_layers = sum(isinstance(s, SampleWeights) for s in mixed.per_sample.values())
    alone = torch.cat(alone_images)
    difference = float((mixed_images - alone).abs().max())
    effect = float((alone[0] - run_base(base, prompts, noise, steps)).abs().max())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "model": label,
        "jobs": jobs,
        "steps": steps,
        "guidance": GUIDANCE,
        "size": base.facts.resolution,
        "targets": TARGETS,
        "target_layers": len(base.lora_spec.modules),
        "conv_layers": sum(len(shape) == 4 for shape in base.lora_spec.modules.values()),
        "rank": int(adapters[0].rank),
        "unet_parameters": sum(p.numel() for p in base.unet.parameters()),
        "repeats": repeats,
        "samples_s": samples,
        **{f"{name}_s": value for name, value in medians.items()},
        "speedup_vs_one_by_one": medians["one_by_one"] / medians["mixed_batch"],
        "speed_vs_shared": medians["shared_batch"] / medians["mixed_batch"],
        "shared_speedup_vs_one_by_one": medians["one_by_one"] / medians["shared_batch"],
        "max_difference": difference,
        "adapter_effect": effect,
        "stacked_bytes": stacked_bytes,
        "sample_merge_bytes": SAMPLE_MERGE_BYTES,
        "merged_layers": merged_layers,
    }


def run_base(base: BaseModel, prompts: Conditioning, noise: torch.Tensor, steps: int) -> Any:
    """Job 0's image without adapters: how far its mix moves it (the scale of the tolerance)."""
    out = generate(
        base, prompts.rows(slice(0, 1)), steps=steps, guidance=GUIDANCE, start_latents=noise[0:1]
    )
    return out.images


# -- reporting -----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Mixed-adapter batches (`make bench`: bench/mixed_batches.py)",
        "",
        f"Measured on this machine: {report['machine']}; torch {report['torch']}, "
        f"diffusers {report['diffusers']}. Command: `{report['command']}`"
        f"{' (niced)' if report.get('niced') else ''}; the run took "
        f"{report['wall_s'] / 60:.0f} min.",
        "",
        "Queued 1-image jobs (each with its own prompt and seed) with 2-adapter mixes (0.6/0.4 "
        "of two different cached adapters, rank 8, LoRA preset `full`: attention, feed-forward, "
        "proj_in/out and the ResNet convolutions), classifier-free guidance 3. *One by one*: "
        "each job alone under its own mix. *Shared mix*: the jobs under one mix in one UNet "
        "batch (all batching could do before), the mix unmerged as the worker runs every mix. "
        "*Mixed*: every job under a different mix in one UNet batch, each image with its own "
        "merged weights on the layers whose LoRA pairs cost most against the layer (within "
        "`TESSERA_INFERENCE_SAMPLE_MERGE_BYTES`) and its own stacked pairs elsewhere "
        "(`AdapterCache.batch_mix`, what the inference worker runs; building that mix is timed "
        "with the batch). Median seconds of the interleaved runs after a warm-up. "
        f"Aims: mixed batch >= {SPEEDUP_AIM}x faster than one by one, and >= {SHARED_AIM}x the "
        "speed of the shared-mix batch.",
        "",
        "| model | jobs x steps | one by one s | shared mix, one batch s | mixed, one batch s "
        "| mixed vs one by one | mixed vs shared (speed) | max image difference "
        "(mixed vs alone) | the mix's own effect |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["models"]:
        lines.append(
            f"| {row['model']} | {row['jobs']} x {row['steps']} | {row['one_by_one_s']:.2f} | "
            f"{row['shared_batch_s']:.2f} | {row['mixed_batch_s']:.2f} | "
            f"**{row['speedup_vs_one_by_one']:.2f}x** | **{row['speed_vs_shared']:.2f}x** | "
            f"{row['max_difference']:.1e} | {row['adapter_effect']:.2f} |"
        )
    lines += ["", "## Details", ""]
    for row in report["models"]:
        samples = "; ".join(
            f"{name}: " + ", ".join(f"{s:.2f}" for s in values)
            for name, values in row["samples_s"].items()
        )
        lines.append(
            f"- **{row['model']}**: {row['unet_parameters'] / 1e6:,.1f}M UNet parameters, "
            f"{row['size']}x{row['size']} images, {row['target_layers']} target layers "
            f"({row['conv_layers']} of them convolutions), rank {row['rank']}; "
            f"{row['repeats']} runs of each ({samples} s). The mixed batch's own tensors took "
            f"{row['stacked_bytes'] / 2**20:,.1f} MiB: {_merged(row)}. A shared-mix batch is "
            f"{row['shared_speedup_vs_one_by_one']:.2f}x faster than one by one."
        )
    lines += [
        "",
        f"Tolerance: each job's image in the mixed batch must equal the same job run alone to "
        f"{TOLERANCE:g} (largest absolute difference, images in [-1, 1]: float rounding of "
        "another batch size and of the stacked products); the last column is how far job 0's "
        "mix moves its image from the base alone, for scale.",
    ]
    if report.get("notes"):
        lines += ["", *report["notes"]]
    lines += ["", f"![mixed-adapter batches]({NAME}.png)", ""]
    return "\n".join(lines)


def _merged(row: dict[str, Any]) -> str:
    """How the mixed batch served its layers (rows from before per-image merging say nothing)."""
    if "merged_layers" not in row:
        return "LoRA pairs stacked per image on every layer"
    return (
        f"{row['merged_layers']} of {row['target_layers']} layers with each image's merged "
        f"weight (within {row['sample_merge_bytes'] / 2**20:,.0f} MiB), the others with its "
        "LoRA pairs stacked"
    )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = report["models"]
    figure, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4.2), squeeze=False)
    for axis, row in zip(axes[0], rows, strict=True):
        names = ["one_by_one", "shared_batch", "mixed_batch"]
        labels = ["one by one", "shared mix,\none batch", "16 mixes,\none batch"]
        values = [row[f"{name}_s"] for name in names]
        axis.bar(labels, values, color=["#999999", "#4c72b0", "#dd8452"])
        for x, value in enumerate(values):
            axis.text(x, value, f"{value:.2f} s", ha="center", va="bottom")
        axis.set(
            ylabel="seconds (median)",
            title=f"{row['model']}: {row['jobs']} jobs x {row['steps']} steps",
        )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=16, help="queued 1-image jobs")
    parser.add_argument("--steps", type=int, default=20, help="steps on the tiny model")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way (tiny model)")
    parser.add_argument("--sd-steps", type=int, default=1, help="steps on the SD-1.5-sized UNet")
    parser.add_argument("--sd-repeats", type=int, default=1, help="runs of each way (SD-1.5)")
    parser.add_argument("--sd-size", type=int, default=128, help="SD-1.5-sized UNet: pixels")
    parser.add_argument("--sd-model", type=Path, help="the random SD-1.5 folder (built if missing)")
    parser.add_argument("--skip-sd", action="store_true", help="the tiny model only")
    common_arguments(parser)
    args = parser.parse_args(argv)
    if args.report_only:
        report = json.loads((args.out / f"{NAME}.json").read_text())
        write_report(report, args.out, NAME, markdown=markdown, plot=plot)
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import os

    import diffusers

    started = time.perf_counter()
    rows = [
        bench_model(
            "bundled tiny model",
            load_base_model(targets=TARGETS),
            jobs=args.jobs,
            steps=args.steps,
            repeats=args.repeats,
        )
    ]
    if not args.skip_sd:
        with tempfile.TemporaryDirectory() as scratch:
            folder = args.sd_model or Path(scratch) / "sd15-random"
            rows.append(
                bench_model(
                    "SD-1.5-sized UNet (random weights)",
                    sd15_base(folder, args.sd_size),
                    jobs=args.jobs,
                    steps=args.sd_steps,
                    repeats=args.sd_repeats,
                )
            )
    report = {
        "machine": machine(args.threads),
        "niced": os.nice(0) > 0,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "command": "python bench/mixed_batches.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": time.perf_counter() - started,
        "models": rows,
    }
    write_report(report, args.out, NAME, markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
