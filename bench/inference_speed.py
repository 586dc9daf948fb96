"""Inference speed: switching adapter mixes, cold loads and blended generation, side by side.

    python bench/inference_speed.py --out docs

One run, on this machine, Tessera's inference path against diffusers + peft on the same UNet:

(a) *Switch* between cached 2-adapter mixes as the number of cached adapters grows (1, 10, 50,
    200). Tessera: `AdapterCache.mix(pins)` (a hit) and entering `use_mix`, which is what a job
    does before its first step. diffusers: `set_adapters(names, weights)` with the same
    adapters loaded into the UNet. The same random sequence of mixes for both.
(b) *Cold load* of one adapter. Tessera: `AdapterCache.get` on a miss (database row, S3 GET
    from the embedded SeaweedFS, sha256 check, full validation), and the same plus building
    a mix on it (unmerged, as the worker serves it). diffusers: `load_lora_weights` from a
    local safetensors file.
(c) *Generation* (20 steps, guidance 3) with a 2-adapter 0.7/0.3 blend, relative to the base
    model with no adapter (the floor), at batch 1 and 16; diffusers runs the same loop with
    its two adapters active (unmerged LoRA branches).
(d) *Grouping*: queued jobs sharing a mix (16 jobs of 1 image, 4 jobs of 4), one after another
    against one UNet batch (each job with its own prompt and seed), as a batching inference
    worker runs them.

Before timing, one UNet forward pass under each system's blend is compared: they must agree,
or the comparison would be between different computations.

The adapters are random rank-8 ones published through the worker's own publishing code into
a fresh embedded stack (SQLite, SeaweedFS) in a temporary folder. Writes
docs/bench_inference.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    common_arguments,
    embedded_backends,
    machine,
    ms,
    per_call,
    summary,
    write_report,
)
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors.torch import save_file
from sqlalchemy.orm import Session, sessionmaker

from services.inference.worker.cache import AdapterCache
from services.worker.publishing import ToPublish, publish_version
from tessera.federation import CLUSTER_PREFIX
from tessera.lora import LoraAdapter, random_adapter
from tessera.lora.mixing import use_mix
from tessera.model.base import BaseModel, load_base_model
from tessera.model.generate import generate, seeded_latents
from tessera.models import AdapterKind, Round, RoundState
from tessera.storage import ObjectStore

CACHED_COUNTS = (1, 10, 50, 200)
RANK = 8
BLEND = (0.7, 0.3)
SWITCHES = 200
COLD_LOADS = 20


class UNetLoraPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """The smallest pipeline that carries diffusers' own `load_lora_weights` / `set_adapters`."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.register_modules(unet=unet)
        self.text_encoder = None  # no LoRA keys for it in our files


# -- the stack and the adapters ------------------------------------------------------------------


def publish_random(
    sessions: sessionmaker[Session], store: ObjectStore, base: BaseModel, count: int, first: int
) -> tuple[list[int], list[LoraAdapter]]:
    """Publish `count` random rank-8 adapters as clusters `first`..; their version ids."""
    with sessions() as session:
        round_row = Round(number=first + 1, state=RoundState.PUBLISHED)
        session.add(round_row)
        session.commit()
        round_id = round_row.id
    ids, adapters = [], []
    for label in range(first, first + count):
        adapter = random_adapter(base.lora_spec, RANK, float(RANK), seed=label)
        output = ToPublish(
            name=f"{CLUSTER_PREFIX}{label}",
            kind=AdapterKind.CLUSTER,
            cluster_label=label,
            adapter=adapter,
            metrics={"updates": 1},
        )
        published = publish_version(
            output, round_id=round_id, method="bench", sessions=sessions, store=store
        )
        ids.append(published.version_id)
        adapters.append(adapter)
    return ids, adapters


def save_for_diffusers(adapter: LoraAdapter, path: Path) -> Path:
    """As diffusers reads a UNet LoRA: `unet.`-prefixed peft keys, fp16 as on our wire."""
    tensors = {f"unet.{k}": v.half().contiguous() for k, v in adapter.tensors.items()}
    save_file(tensors, str(path))
    return path


# -- measuring -----------------------------------------------------------------------------------


def mix_sequence(count: int, switches: int, seed: int) -> list[tuple[tuple[int, float], ...]]:
    """Indices of the adapters in each mix to switch to; never the mix already active."""
    if count == 1:
        mixes = [((0, 1.0),), ((0, 0.5),)]
    else:
        mixes = [((i, BLEND[0]), ((i + 1) % count, BLEND[1])) for i in range(count)]
    rng = random.Random(seed)
    sequence, current = [], -1
    for _ in range(switches):
        choice = rng.choice([i for i in range(len(mixes)) if i != current])
        sequence.append(mixes[choice])
        current = choice
    return sequence


def tessera_switch(cache: AdapterCache, version_ids: list[int]) -> Callable[[Any], None]:
    def switch(mix: tuple[tuple[int, float], ...]) -> None:
        prepared = cache.mix([(version_ids[i], w) for i, w in mix])
        with use_mix(prepared.merged):
            pass  # a job's first UNet call would run here, under the (unmerged) mix

    return switch


def diffusers_switch(pipe: UNetLoraPipeline) -> Callable[[Any], None]:
    def switch(mix: tuple[tuple[int, float], ...]) -> None:
        pipe.set_adapters([f"a{i}" for i, _ in mix], adapter_weights=[w for _, w in mix])

    return switch


def check_same_output(
    base: BaseModel,
    reference: BaseModel,
    cache: AdapterCache,
    pipe: UNetLoraPipeline,
    ids: list[int],
) -> float:
    """Largest difference of one UNet pass under the 0.7/0.3 blend of adapters 0 and 1."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    context = torch.randn(2, 16, 384, generator=generator)
    pipe.set_adapters(["a0", "a1"], adapter_weights=list(BLEND))
    prepared = cache.mix([(ids[0], BLEND[0]), (ids[1], BLEND[1])])
    with torch.no_grad(), use_mix(prepared.merged):
        ours = base.unet(x, 500, context).sample
    with torch.no_grad():
        theirs = reference.unet(x, 500, context).sample
        plain = base.unet(x, 500, context).sample
    difference = float((ours - theirs).abs().max())
    effect = float((ours - plain).abs().max())
    if not difference < 1e-3 * max(effect, 1e-6) + 1e-5:
        raise AssertionError(f"the two blends differ by {difference} (the blend's effect {effect})")
    return difference


def bench_switch(
    base: BaseModel,
    cache: AdapterCache,
    pipe: UNetLoraPipeline,
    ids: list[int],
    adapters: list[LoraAdapter],
    folder: Path,
    switches: int,
    counts: Sequence[int],
) -> list[dict[str, Any]]:
    rows = []
    loaded = 0
    for count in counts:
        ours_loads, theirs_loads = [], []
        for index in range(loaded, count):  # grow both to `count` adapters
            start = time.perf_counter()
            cache.get(ids[index])
            ours_loads.append(time.perf_counter() - start)
            path = save_for_diffusers(adapters[index], folder / f"a{index}.safetensors")
            start = time.perf_counter()
            pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
            theirs_loads.append(time.perf_counter() - start)
            if (index + 1) % 10 == 0:
                print(f"  loaded {index + 1}: diffusers {theirs_loads[-1]:.2f} s", flush=True)
        loaded = count
        sequence = mix_sequence(count, switches, seed=count)
        ours, theirs = tessera_switch(cache, ids), diffusers_switch(pipe)
        for mix in {m for m in sequence}:
            ours(mix)  # every mix merged and cached once: the switches below are all hits
        assert len(cache.cached_versions()) == count
        rows.append(
            {
                "cached_adapters": count,
                "tessera": summary(per_call(ours, sequence)),
                "diffusers": summary(per_call(theirs, sequence)),
                # Loading the adapters that took the count to this row: the last one's time.
                "tessera_last_load_s": ours_loads[-1],
                "diffusers_last_load_s": theirs_loads[-1],
            }
        )
        print(f"switch with {count:>3} cached: {rows[-1]}", flush=True)
    return rows


def bench_cold_load(
    base: BaseModel, cache: AdapterCache, ids: list[int], adapters: list[LoraAdapter], folder: Path
) -> dict[str, Any]:
    half = len(ids) // 2
    get_ids, mix_ids = ids[:half], ids[half:]
    fresh = UNetLoraPipeline(load_base_model().unet)
    paths = [
        save_for_diffusers(adapter, folder / f"cold{i}.safetensors")
        for i, adapter in enumerate(adapters)
    ]

    def diffusers_load(index: int) -> None:
        fresh.load_lora_weights(str(paths[index]), adapter_name=f"cold{index}")

    diffusers_samples = []
    for index in range(len(paths)):
        start = time.perf_counter()
        diffusers_load(index)
        diffusers_samples.append(time.perf_counter() - start)
        fresh.delete_adapters(f"cold{index}")  # not timed: keep one adapter loaded at a time
    before = list(cache.stats.loads)
    get_samples = per_call(cache.get, get_ids)
    mix_samples = per_call(lambda v: cache.mix([(v, 1.0)]), mix_ids)
    assert cache.stats.loads[len(before) :] == get_ids + mix_ids  # every one was a miss
    return {
        "size_bytes_fp16": sum(t.numel() * 2 for t in adapters[0].tensors.values()),
        "tessera_get": summary(get_samples),
        "tessera_get_and_merge": summary(mix_samples),
        "diffusers_load_lora_weights": summary(diffusers_samples),
    }


def bench_generation(
    base: BaseModel,
    reference: BaseModel,
    cache: AdapterCache,
    pipe: UNetLoraPipeline,
    ids: list[int],
    repeats: int,
    batches: Sequence[int],
) -> list[dict[str, Any]]:
    tokens = base.prompts.encode([f"a red circle number {i}" for i in range(max(batches))])
    merged = cache.mix([(ids[0], BLEND[0]), (ids[1], BLEND[1])]).merged
    pipe.set_adapters(["a0", "a1"], adapter_weights=list(BLEND))
    rows = []
    for batch in batches:
        prompt = tokens.rows(slice(0, batch))
        runs: dict[str, Callable[[], object]] = {
            "floor": lambda p=prompt: generate(base, p, steps=20),
            "tessera": lambda p=prompt: generate(base, p, steps=20, merged=merged),
            "diffusers": lambda p=prompt: generate(reference, p, steps=20),
        }
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(repeats):  # interleaved, so drift in the machine's load hits all three
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        rows.append(
            {
                "batch": batch,
                **{f"{name}_s": value for name, value in medians.items()},
                "tessera_ratio": medians["tessera"] / medians["floor"],
                "diffusers_ratio": medians["diffusers"] / medians["floor"],
                "repeats": repeats,
            }
        )
        print(f"generation batch {batch}: {rows[-1]}", flush=True)
    return rows


def bench_grouping(
    base: BaseModel, cache: AdapterCache, ids: list[int], repeats: int, jobs: int, images: int
) -> dict[str, Any]:
    """`jobs` queued jobs of `images` images sharing a mix: run one after another (each job
    alone), against one UNet batch with each job's own seed (what a batching worker does)."""
    tokens = base.prompts.encode([f"a blue star number {i}" for i in range(jobs * images)])
    merged = cache.mix([(ids[0], BLEND[0]), (ids[1], BLEND[1])]).merged

    def one_by_one() -> None:
        for job in range(jobs):
            prompt = tokens.rows(slice(job * images, (job + 1) * images))
            generate(base, prompt, steps=20, seed=job, merged=merged)

    def batched() -> None:
        noise = torch.cat([seeded_latents(base, images, job) for job in range(jobs)])
        generate(base, tokens, steps=20, start_latents=noise, merged=merged)

    runs = {"one_by_one": one_by_one, "batched": batched}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    row = {
        "jobs": jobs,
        "images_each": images,
        "one_by_one_s": medians["one_by_one"],
        "batched_s": medians["batched"],
        "speedup": medians["one_by_one"] / medians["batched"],
        "repeats": repeats,
    }
    print(f"grouping: {row}", flush=True)
    return row


def grouping_rows(
    base: BaseModel, cache: AdapterCache, ids: list[int], repeats: int, images: int
) -> list[dict[str, Any]]:
    """`images` images in all: as many 1-image jobs, then 4 jobs sharing them."""
    scenarios = [(images, 1), (4, max(1, images // 4))]
    return [bench_grouping(base, cache, ids, repeats, jobs, each) for jobs, each in scenarios]


def regroup(args: argparse.Namespace) -> None:
    """Measure (d) again and put it into the existing report (`--only-grouping`)."""
    path = args.out / "bench_inference.json"
    report = json.loads(path.read_text())
    base = load_base_model()
    with (
        tempfile.TemporaryDirectory() as scratch,
        embedded_backends(Path(scratch) / "stack") as (sessions, store),
    ):
        ids, _ = publish_random(sessions, store, base, 2, first=0)
        cache = AdapterCache(base=base, sessions=sessions, store=store, max_bytes=1 << 30)
        report["grouping"] = grouping_rows(base, cache, ids, args.repeats, max(args.batches))
    report["grouping_machine"] = machine(args.threads)
    write_report(report, args.out, "bench_inference", markdown=markdown, plot=plot)


# -- reporting -----------------------------------------------------------------------------------


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def markdown(report: dict[str, Any]) -> str:
    cold = report["cold_load"]
    lines = [
        "# Inference speed (`make bench`: bench/inference_speed.py)",
        "",
        f"Measured on this machine: {report['machine']}; torch {report['torch']}, "
        f"diffusers {report['diffusers']}, peft {report['peft']}. Adapters are rank {RANK} on "
        f"all {report['target_layers']} attention projections of the tiny UNet "
        f"({cold['size_bytes_fp16'] / 1e3:.0f} kB each in fp16). Before timing, one UNet pass "
        f"under the 0.7/0.3 blend was compared between the two systems: largest difference "
        f"{report['max_difference']:.1e}.",
        "",
        "## (a) Switching between cached mixes",
        "",
        f"{report['switches']} switches between 2-adapter mixes (0.7/0.3) of the cached "
        "adapters, in the same random order for both; microseconds per switch. Tessera: "
        "`AdapterCache.mix` (a hit) and entering `use_mix`. diffusers: `set_adapters` with "
        "all the adapters loaded in the UNet.",
        "",
        "| cached adapters | Tessera median µs | Tessera p95 µs | diffusers median µs "
        "| diffusers p95 µs | diffusers / Tessera | load of the last adapter: Tessera ms "
        "| diffusers ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["switch"]:
        ours, theirs = row["tessera"], row["diffusers"]
        lines.append(
            f"| {row['cached_adapters']} | {_us(ours['median_s'])} | {_us(ours['p95_s'])} | "
            f"{_us(theirs['median_s'])} | {_us(theirs['p95_s'])} | "
            f"{theirs['median_s'] / ours['median_s']:,.0f}x | "
            f"{ms(row['tessera_last_load_s'])} | {ms(row['diffusers_last_load_s'])} |"
        )
    lines += [
        "",
        "The last two columns time loading the adapter that brought the count to that row "
        "(Tessera: into the cache from the object store; diffusers: `load_lora_weights` into "
        "the UNet). A Tessera mix is built unmerged on every switch: no merge to wait for.",
    ]
    lines += [
        "",
        "## (b) Cold load of one adapter",
        "",
        f"{cold['tessera_get']['n']} adapters each way (Tessera) and "
        f"{cold['diffusers_load_lora_weights']['n']} (diffusers); "
        "milliseconds.",
        "",
        "| what | median ms | p95 ms |",
        "|---|---|---|",
    ]
    for key, label in (
        ("tessera_get", "Tessera: `AdapterCache.get`, a miss (DB row, S3 GET, sha256, validate)"),
        ("tessera_get_and_merge", "Tessera: the same, then a new (unmerged) mix on it"),
        ("diffusers_load_lora_weights", "diffusers: `load_lora_weights` from a local file"),
    ):
        lines.append(f"| {label} | {ms(cold[key]['median_s'])} | {ms(cold[key]['p95_s'])} |")
    lines += [
        "",
        "## (c) Generation with a 2-adapter blend, against the base alone (the floor)",
        "",
        "20 steps, guidance 3 (two UNet passes per step), 32x32; median seconds of "
        f"{report['generation'][0]['repeats']} interleaved runs after a warm-up. Tessera runs "
        "the mix unmerged (LoRA terms beside each target layer); diffusers' UNet still holds "
        "every adapter loaded in (a), two of them active, whose LoRA branches run beside each "
        "projection at every step.",
        "",
        "| batch | floor s | Tessera blend s | Tessera / floor | diffusers blend s "
        "| diffusers / floor |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["generation"]:
        lines.append(
            f"| {row['batch']} | {row['floor_s']:.3f} | {row['tessera_s']:.3f} | "
            f"{row['tessera_ratio']:.3f}x | {row['diffusers_s']:.3f} | "
            f"{row['diffusers_ratio']:.3f}x |"
        )
    grouping = report.get("grouping") or []
    if grouping:
        lines += [
            "",
            "## (d) Queued jobs that share a mix, run as one batch",
            "",
            "Jobs with the same mix, steps and guidance (what `TESSERA_INFERENCE_MAX_BATCH_IMAGES` "
            "lets an inference worker group): one after another, as each job alone, against one "
            "UNet batch in which each job keeps its own prompt and seed; median seconds of "
            f"{grouping[0]['repeats']} interleaved runs ({report.get('grouping_machine', '')}).",
            "",
            "| jobs x images | one after another s | one batch s | speed-up |",
            "|---|---|---|---|",
        ]
        for row in grouping:
            lines.append(
                f"| {row['jobs']} x {row['images_each']} | {row['one_by_one_s']:.3f} | "
                f"{row['batched_s']:.3f} | {row['speedup']:.2f}x |"
            )
    lines += ["", "![switch time and blend cost](bench_inference.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    counts = [row["cached_adapters"] for row in report["switch"]]
    for system, marker in (("tessera", "o"), ("diffusers", "s")):
        medians = [row[system]["median_s"] * 1e6 for row in report["switch"]]
        left.plot(counts, medians, marker=marker, label=system)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="cached adapters",
        ylabel="µs per switch (median)",
        title="(a) switching between cached mixes",
    )
    left.legend()
    left.grid(True, which="both", alpha=0.3)
    batches = [str(row["batch"]) for row in report["generation"]]
    width = 0.35
    positions = range(len(batches))
    for offset, system in ((-width / 2, "tessera"), (width / 2, "diffusers")):
        right.bar(
            [p + offset for p in positions],
            [row[f"{system}_ratio"] for row in report["generation"]],
            width,
            label=system,
        )
    right.axhline(1.0, color="black", linewidth=1)
    right.axhline(1.1, color="grey", linestyle="--", linewidth=1, label="aim: 1.1x")
    right.set_xticks(list(positions), [f"batch {b}" for b in batches])
    right.set(ylabel="time / base alone", title="(c) 2-adapter blend, 20 steps")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="generation runs per variant")
    parser.add_argument("--switches", type=int, default=SWITCHES)
    parser.add_argument(
        "--counts", type=int, nargs="+", default=list(CACHED_COUNTS), help="cached adapters"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--cold-loads", type=int, default=COLD_LOADS, help="adapters loaded cold")
    parser.add_argument(
        "--only-grouping", action="store_true", help="measure (d) again into the existing report"
    )
    common_arguments(parser)
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(
            json.loads((args.out / "bench_inference.json").read_text()),
            args.out,
            "bench_inference",
            markdown=markdown,
            plot=plot,
        )
        return
    torch.set_num_threads(args.threads)
    if args.only_grouping:
        regroup(args)
        return
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import diffusers
    import peft

    base, reference = load_base_model(), load_base_model()
    pipe = UNetLoraPipeline(reference.unet)
    biggest = max(max(args.counts), 2)
    with (
        tempfile.TemporaryDirectory() as scratch,
        embedded_backends(Path(scratch) / "stack") as (
            sessions,
            store,
        ),
    ):
        folder = Path(scratch)
        started = time.perf_counter()
        ids, adapters = publish_random(sessions, store, base, biggest, first=0)
        cold_ids, cold_adapters = publish_random(
            sessions, store, base, args.cold_loads, first=biggest
        )
        published = biggest + args.cold_loads
        print(f"published {published} adapters in {time.perf_counter() - started:.1f} s")

        def new_cache() -> AdapterCache:
            return AdapterCache(base=base, sessions=sessions, store=store, max_bytes=4 << 30)

        cold = bench_cold_load(base, new_cache(), cold_ids, cold_adapters, folder)
        print(f"cold load: {cold}", flush=True)
        cache = new_cache()
        switch = bench_switch(
            base, cache, pipe, ids, adapters, folder, args.switches, sorted(args.counts)
        )
        difference = check_same_output(base, reference, cache, pipe, ids)
        generation = bench_generation(base, reference, cache, pipe, ids, args.repeats, args.batches)
        grouping = grouping_rows(base, cache, ids, args.repeats, max(args.batches))
    report = {
        "machine": machine(args.threads),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "target_layers": len(base.lora_spec.modules),
        "switches": args.switches,
        "max_difference": difference,
        "switch": switch,
        "cold_load": cold,
        "generation": generation,
        "grouping": grouping,
        "grouping_machine": machine(args.threads),
    }
    write_report(report, args.out, "bench_inference", markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
