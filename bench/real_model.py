"""Tessera against diffusers + peft on an SD-1.5-sized UNet (random weights), in one run.

    python bench/real_model.py --out docs [--model FOLDER] [--device cuda --dtype float16]

The other benchmarks use the bundled tiny model; this one uses the real SD-1.5 UNet dimensions
(860M parameters, 768-wide conditioning, 64x64 latents for 512x512 images) built by
`tessera.model.synthetic.build_random_folder(..., "sd1", size="full", cond_width=768)` with
random weights: the timings and bytes are those of SD-1.5, what it generates means nothing.
Both systems run on the same UNet weights (loaded twice: Tessera's and diffusers' copy):

1. one LoRA training step at the model's resolution, batch 1, rank 8 on the attention
   projections: Tessera's `train_lora` (the step alone: `steps=1` minus `steps=0`, so attaching
   and removing peft is reported apart) against `unet.add_adapter(LoraConfig(...))` and one
   AdamW step as diffusers' train_text_to_image_lora.py does, on the same latents and prompt;
2. one generation step (one UNet call with classifier-free guidance, batch 1): the base alone,
   a 0.7/0.3 blend of two adapters in Tessera (unmerged, as it serves), and in diffusers with
   both adapters active through `set_adapters` (unfused) and after `fuse_lora`;
3. memory per cached adapter: Tessera's accounted bytes and the resident-set growth per adapter
   cached, against diffusers' per `load_lora_weights`; and what one merged 2-adapter mix costs;
4. switching between cached 2-adapter mixes with 1 / 10 / 50 / 200 adapters cached: Tessera's
   `AdapterCache.mix` + `use_mix` against diffusers' `set_adapters` with that many loaded
   (diffusers only up to `--diffusers-max` adapters: loading grows slower with every adapter);
5. cold load of one adapter: Tessera (file bytes, validated, placed on the model's device)
   against diffusers' `load_lora_weights` from a file.

Adapters are random rank-8 ones, published into a fresh embedded stack (SQLite, SeaweedFS) as
the inference worker reads them; diffusers reads the same adapters exported to its format.
Writes docs/bench_real_model.md, .json and .png. The model folder is built in a temporary
folder (3.4 GB, about a minute) unless `--model` names one (built there when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    common_arguments,
    embedded_backends,
    machine,
    ms,
    per_call,
    resident_bytes,
    summary,
    write_report,
)
from inference_speed import (
    BLEND,
    RANK,
    UNetLoraPipeline,
    diffusers_switch,
    mix_sequence,
    publish_random,
    tessera_switch,
)

from services.inference.worker.cache import AdapterCache
from tessera.lora import LoraAdapter, random_adapter
from tessera.lora.files import adapter_to_bytes, validate_adapter_bytes
from tessera.lora.interop import export_adapter
from tessera.lora.mixing import ActiveMix, merge_mix, place_adapter, tensor_bytes
from tessera.lora.train import loss_target, train_lora
from tessera.model.base import BaseModel, load_base_model
from tessera.model.conditioning import Conditioning
from tessera.model.generate import generate
from tessera.model.latents import encode_images
from tessera.model.synthetic import Size, build_random_folder

NAME = "bench_real_model"
CACHED_COUNTS = (1, 10, 50, 200)
DIFFUSERS_MAX = 50
SWITCHES = 50
COLD_LOADS = 5
COND_WIDTH = 768  # SD-1.5's CLIP ViT-L/14 width
AIM = 1.15  # the blend overhead the issue asks of Tessera, relative to the base alone
PROMPT = "a watercolour painting of a lighthouse at dusk"


# -- the model and the data ----------------------------------------------------------------------


def model_folder(path: Path, size: Size) -> Path:
    """The random SD-1.x folder at `path`, built there first when missing."""
    if not (path / "model_index.json").exists():
        started = time.perf_counter()
        build_random_folder(
            path, "sd1", size=size, cond_width=COND_WIDTH if size == "full" else None
        )
        print(f"built {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def training_data(base: BaseModel) -> tuple[torch.Tensor, Conditioning]:
    """One smooth random image at the model's resolution in [-1, 1], and its prompt."""
    generator = torch.Generator().manual_seed(0)
    side = base.facts.resolution
    coarse = torch.rand(1, 3, side // 8, side // 8, generator=generator) * 2 - 1
    image = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
    return image, base.prompts.encode([PROMPT])


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_in_use(device: torch.device) -> int:
    """Bytes held now: the process's resident set on the CPU, allocated tensors on CUDA."""
    if device.type == "cuda":
        synchronise(device)
        return int(torch.cuda.memory_allocated(device))
    return resident_bytes()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronise(device)
    start = time.perf_counter()
    fn()
    synchronise(device)
    return time.perf_counter() - start


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


# -- 1. one training step ------------------------------------------------------------------------


@contextlib.contextmanager
def diffusers_lora_step(
    base: BaseModel, latents: torch.Tensor, context: Conditioning, rank: int
) -> Iterator[Callable[[], float]]:
    """diffusers' LoRA recipe on the UNet (train_text_to_image_lora.py): a Gaussian-initialised
    LoRA on to_q/to_k/to_v/to_out.0 added with `add_adapter`, trained in float32, AdamW; yields
    one training step (latents and text embeddings computed once, as Tessera does)."""
    from peft import LoraConfig

    unet = base.unet
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    optimiser = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
    scheduler = base.noise_scheduler
    generator = torch.Generator().manual_seed(0)
    device, embeds = base.device, context.embeds.to(base.device, base.dtype)
    autocast = (
        torch.autocast(device.type, dtype=base.dtype)
        if device.type != "cpu" and base.dtype != torch.float32
        else contextlib.nullcontext()
    )

    def step() -> float:
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t).to(device, base.dtype)
        target = loss_target(scheduler, latents, noise, t).to(device)
        with autocast:
            pred = unet(noisy, t.to(device), embeds, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        return float(loss.item())

    unet.train()
    try:
        yield step
    finally:
        unet.eval()
        unet.unload_lora()
        unet.requires_grad_(False)


def bench_training(
    base: BaseModel, reference: BaseModel, image: torch.Tensor, prompt: Conditioning, repeats: int
) -> dict[str, Any]:
    """Tessera's step (train_lora steps=1 minus steps=0) and diffusers' step, after a warm-up."""

    def tessera(steps: int) -> Callable[[], object]:
        return lambda: train_lora(base, image, prompt, rank=RANK, steps=steps, batch_size=1)

    device = base.device
    tessera(1)()  # warm-up
    ours: dict[str, list[float]] = {"steps_1": [], "steps_0": []}
    for _ in range(repeats):
        ours["steps_1"].append(timed(tessera(1), device))
        ours["steps_0"].append(timed(tessera(0), device))
    ours_median = medians(ours)
    latents = encode_images(reference, image)
    with diffusers_lora_step(reference, latents, prompt, RANK) as step:
        trainable = sum(p.numel() for p in reference.unet.parameters() if p.requires_grad)
        step()  # warm-up
        theirs = [timed(step, device) for _ in range(repeats)]
    row = {
        "tessera_step_s": ours_median["steps_1"] - ours_median["steps_0"],
        "tessera_train_lora_1_step_s": ours_median["steps_1"],
        "tessera_setup_s": ours_median["steps_0"],
        "diffusers_step_s": statistics.median(theirs),
        "tessera_lora_parameters": random_adapter(
            base.lora_spec, RANK, float(RANK), seed=0
        ).parameters,
        "diffusers_lora_parameters": trainable,
        "repeats": repeats,
    }
    print(f"training: {row}", flush=True)
    return row


# -- 2. one generation step ----------------------------------------------------------------------


def one_step(base: BaseModel, prompt: Conditioning, active: ActiveMix | None) -> torch.Tensor:
    """The latents after one guided UNet call (DDIM, first of 2 steps; no VAE decode)."""
    return generate(base, prompt, merged=active, steps=2, stop_step=1, sampler="ddim").latents


def bench_generation(
    base: BaseModel,
    reference: BaseModel,
    pipe: UNetLoraPipeline,
    blend: ActiveMix,
    prompt: Conditioning,
    repeats: int,
) -> dict[str, Any]:
    """Base, Tessera's unmerged blend, diffusers unfused and fused; interleaved repeats."""
    names = ["a0", "a1"]
    pipe.set_adapters(names, adapter_weights=list(BLEND))
    samples: dict[str, list[float]] = {
        name: [] for name in ("base", "tessera_blend", "diffusers_unfused", "diffusers_fused")
    }
    fuse_s: list[float] = []
    unfuse_s: list[float] = []

    def fused() -> torch.Tensor:
        fuse_s.append(timed(lambda: pipe.fuse_lora(adapter_names=names), base.device))
        try:
            start = time.perf_counter()
            out = one_step(reference, prompt, None)
            samples["diffusers_fused"].append(time.perf_counter() - start)
        finally:
            unfuse_s.append(timed(pipe.unfuse_lora, base.device))
        return out

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "base": lambda: one_step(base, prompt, None),
        "tessera_blend": lambda: one_step(base, prompt, blend),
        "diffusers_unfused": lambda: one_step(reference, prompt, None),
    }
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs compared
    outputs["diffusers_fused"] = fused()
    samples["diffusers_fused"].clear()
    for _ in range(repeats):  # interleaved, so drift in the machine's load hits all four
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
        fused()
    effect = float((outputs["tessera_blend"] - outputs["base"]).abs().max())
    differences = {
        name: float((outputs[name] - outputs["tessera_blend"]).abs().max())
        for name in ("diffusers_unfused", "diffusers_fused")
    }
    if not differences["diffusers_unfused"] <= 1e-2 * effect + 1e-5:
        raise AssertionError(f"the two blends differ: {differences} (the blend's effect {effect})")
    times = medians(samples)
    row = {
        **{f"{name}_s": value for name, value in times.items()},
        **{f"{name}_ratio": value / times["base"] for name, value in times.items()},
        "diffusers_fuse_s": statistics.median(fuse_s),
        "diffusers_unfuse_s": statistics.median(unfuse_s),
        "blend_effect": effect,
        "difference_to_tessera": differences,
        "repeats": repeats,
    }
    print(f"generation: {row}", flush=True)
    return row


# -- 3 and 4. caching adapters and switching between mixes ---------------------------------------


def per_added(before: int, after: int, count: int) -> float:
    return (after - before) / count if count else 0.0


def bench_tessera_switch(
    cache: AdapterCache, ids: list[int], counts: Sequence[int], switches: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Grow the cache to each count (timing each miss), then time `switches` mix switches."""
    device = cache.base.device
    rows: list[dict[str, Any]] = []
    loads: list[float] = []
    memory = [memory_in_use(device)]
    for count in counts:
        for version_id in ids[len(loads) : count]:
            loads.append(timed(partial(cache.get, version_id), device))
            memory.append(memory_in_use(device))
        sequence = mix_sequence(count, switches, seed=count)
        switch = tessera_switch(cache, ids)
        switch(sequence[0])  # warm-up
        rows.append(
            {
                "cached_adapters": count,
                "tessera": summary(per_call(switch, sequence)),
                "tessera_last_load_s": loads[-1],
            }
        )
        print(f"tessera switch, {count} cached: {rows[-1]['tessera']}", flush=True)
    cached = len(loads)
    memory_row = {
        "tessera_accounted_bytes": cache.get(ids[0]).nbytes,
        "tessera_cache_bytes": cache.nbytes,
        "tessera_cached": cached,
        # From the first adapter on: the first load also pays for the stack's client objects.
        "tessera_growth_per_adapter": per_added(memory[1], memory[-1], cached - 1),
        "tessera_get_miss": summary(loads),
    }
    return rows, memory_row


def merged_mix_cost(cache: AdapterCache, ids: list[int]) -> dict[str, Any]:
    """The old design: one 2-adapter mix merged into copies of every weight it touches."""
    device = cache.base.device
    mix = [(cache.get(ids[0]).adapter, BLEND[0]), (cache.get(ids[1]).adapter, BLEND[1])]
    before = memory_in_use(device)
    start = time.perf_counter()
    merged = merge_mix(cache.base.unet, cache.spec, mix)
    synchronise(device)
    seconds = time.perf_counter() - start
    row = {
        "merged_mix_bytes": merged.nbytes,
        "merged_mix_growth": memory_in_use(device) - before,
        "merge_s": seconds,
    }
    del merged
    return row


def diffusers_files(adapters: Sequence[LoraAdapter], folder: Path, prefix: str) -> list[Path]:
    """Each adapter in diffusers' own layout (Tessera's export), as a file."""
    paths = []
    for index, adapter in enumerate(adapters):
        path = folder / f"{prefix}{index}.safetensors"
        path.write_bytes(export_adapter(adapter, "diffusers"))
        paths.append(path)
    return paths


def diffusers_adapter_bytes(unet: torch.nn.Module, name: str) -> int:
    """Bytes of the LoRA parameters peft holds for adapter `name`."""
    return tensor_bytes(
        [p for key, p in unet.named_parameters() if "lora_" in key and f".{name}." in key]
    )


def bench_diffusers_switch(
    pipe: UNetLoraPipeline,
    unet: torch.nn.Module,
    paths: list[Path],
    counts: Sequence[int],
    switches: int,
    device: torch.device,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load into the UNet up to each count (timing each load), then time `set_adapters`."""
    rows: list[dict[str, Any]] = []
    loads: list[float] = []
    memory = [memory_in_use(device)]
    for count in counts:
        for index in range(len(loads), count):
            loads.append(
                timed(
                    partial(pipe.load_lora_weights, str(paths[index]), adapter_name=f"a{index}"),
                    device,
                )
            )
            memory.append(memory_in_use(device))
            if (index + 1) % 10 == 0:
                print(f"  diffusers loaded {index + 1}: {loads[-1]:.2f} s", flush=True)
        sequence = mix_sequence(count, switches, seed=count)
        rows.append(
            {
                "cached_adapters": count,
                "diffusers": summary(per_call(diffusers_switch(pipe), sequence)),
                "diffusers_last_load_s": loads[-1],
            }
        )
        print(f"diffusers switch, {count} loaded: {rows[-1]['diffusers']}", flush=True)
    loaded = len(loads)
    memory_row = {
        "diffusers_accounted_bytes": diffusers_adapter_bytes(unet, "a0"),
        "diffusers_loaded": loaded,
        "diffusers_growth_per_adapter": per_added(memory[1], memory[-1], loaded - 1),
        "diffusers_load": summary(loads),
    }
    return rows, memory_row


# -- 5. cold load --------------------------------------------------------------------------------


def bench_cold_load(
    base: BaseModel, pipe: UNetLoraPipeline, adapters: list[LoraAdapter], folder: Path
) -> dict[str, Any]:
    """Tessera: wire bytes -> validate -> place; diffusers: `load_lora_weights` from a file
    into a UNet with no other adapter (each deleted again, untimed)."""
    device = base.device
    blobs = [adapter_to_bytes(adapter) for adapter in adapters]
    paths = diffusers_files(adapters, folder, "cold")

    def ours(data: bytes) -> None:
        place_adapter(base.unet, validate_adapter_bytes(data, base.lora_spec))

    ours(blobs[0])  # warm-ups
    pipe.load_lora_weights(str(paths[0]), adapter_name="warm-up")
    pipe.delete_adapters("warm-up")
    theirs = []
    for index, path in enumerate(paths):
        theirs.append(
            timed(partial(pipe.load_lora_weights, str(path), adapter_name=f"c{index}"), device)
        )
        pipe.delete_adapters(f"c{index}")
    row = {
        "file_bytes": len(blobs[0]),
        "diffusers_file_bytes": paths[0].stat().st_size,
        "tessera": summary([timed(partial(ours, data), device) for data in blobs]),
        "diffusers": summary(theirs),
    }
    print(f"cold load: {row}", flush=True)
    return row


# -- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import diffusers
    import peft

    base = load_base_model(folder, device=args.device, dtype=args.dtype)
    reference = load_base_model(folder, device=args.device, dtype=args.dtype)
    device = base.device
    counts = sorted(args.counts)
    diffusers_counts = [c for c in counts if c <= args.diffusers_max]
    image, prompt = training_data(base)
    with (
        tempfile.TemporaryDirectory() as scratch,
        embedded_backends(Path(scratch) / "stack") as (sessions, store),
    ):
        started = time.perf_counter()
        ids, adapters = publish_random(sessions, store, base, max(max(counts), 2), first=0)
        print(f"published {len(ids)} adapters in {time.perf_counter() - started:.0f} s", flush=True)
        cache = AdapterCache(base=base, sessions=sessions, store=store, max_bytes=1 << 40)
        switch, memory = bench_tessera_switch(cache, ids, counts, args.switches)
        memory.update(merged_mix_cost(cache, ids))
        blend = cache.mix([(ids[0], BLEND[0]), (ids[1], BLEND[1])]).active
        assert blend is not None and not blend.merged
        pipe = UNetLoraPipeline(reference.unet)
        cold_adapters = [
            random_adapter(base.lora_spec, RANK, float(RANK), seed=10_000 + i)
            for i in range(args.cold_loads)
        ]
        cold = bench_cold_load(base, pipe, cold_adapters, Path(scratch))
        paths = diffusers_files(adapters[: max([*diffusers_counts, 2])], Path(scratch), "a")
        theirs, their_memory = bench_diffusers_switch(
            pipe, reference.unet, paths, diffusers_counts or [2], args.switches, device
        )
        memory.update(their_memory)
        for index in range(their_memory["diffusers_loaded"], 2):  # the blend of (2) needs a0, a1
            pipe.load_lora_weights(str(paths[index]), adapter_name=f"a{index}")
        for row in switch:
            match = [r for r in theirs if r["cached_adapters"] == row["cached_adapters"]]
            row.update(match[0] if match else {"diffusers": None, "diffusers_last_load_s": None})
        generation = bench_generation(base, reference, pipe, blend, prompt, args.repeats)
        pipe.unload_lora_weights()
    training = bench_training(base, reference, image, prompt, args.train_repeats)
    return {
        "machine": machine(args.threads),
        "device": str(device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "model": {
            "what": "SD-1.5-sized UNet with random weights"
            if base.facts.cond_width == COND_WIDTH
            else "a small random SD-1.x folder (smoke test)",
            "unet_parameters": sum(p.numel() for p in base.unet.parameters()),
            "resolution": base.facts.resolution,
            "latents": list(base.facts.sample_shape),
            "cond_width": base.facts.cond_width,
            "target_layers": len(base.lora_spec.modules),
        },
        "rank": RANK,
        "blend": list(BLEND),
        "switches": args.switches,
        "diffusers_max": args.diffusers_max,
        "training": training,
        "generation": generation,
        "memory": memory,
        "switch": switch,
        "cold_load": cold,
    }


# -- reporting -----------------------------------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def markdown(report: dict[str, Any]) -> str:
    model, train, gen = report["model"], report["training"], report["generation"]
    memory, cold = report["memory"], report["cold_load"]
    on_cpu = report["device"] == "cpu"
    growth = "resident-set growth" if on_cpu else "CUDA memory allocated"
    lines = [
        "# Tessera against diffusers + peft at SD-1.5 size (`make bench`: bench/real_model.py)",
        "",
        f"**{model['what']}**: {model['unet_parameters'] / 1e6:,.0f}M UNet parameters, "
        f"{model['resolution']}x{model['resolution']} images "
        f"({'x'.join(map(str, model['latents']))} latents), {model['cond_width']}-wide "
        "conditioning; the weights are random, so the "
        "timings and bytes are SD-1.5's and the images mean nothing. Adapters: rank "
        f"{report['rank']} on all {model['target_layers']} attention projections "
        f"(to_q/to_k/to_v/to_out.0). Both systems run on the same weights in one process.",
        "",
        f"Measured on {report['device']} ({report['dtype']}): {report['machine']}; torch "
        f"{report['torch']}, diffusers {report['diffusers']}, peft {report['peft']}; the run "
        f"took {report.get('wall_s', 0) / 60:.0f} min.",
        "",
    ]
    if on_cpu:
        lines += [
            "**GPU (fp16): not measured here** (this machine has no GPU). On one, run "
            "`python bench/real_model.py --device cuda --dtype float16 --out DIR`.",
            "",
        ]
    lines += [
        "| what | Tessera | diffusers + peft | note |",
        "|---|---|---|---|",
        f"| 1. one LoRA training step, batch 1 | {train['tessera_step_s']:.2f} s | "
        f"{train['diffusers_step_s']:.2f} s | median of {train['repeats']}; Tessera's "
        f"`train_lora(steps=1)` takes {train['tessera_train_lora_1_step_s']:.2f} s in all, "
        f"{train['tessera_setup_s']:.2f} s of it attaching/removing peft and encoding |",
        f"| 2. one generation step (UNet call with CFG, batch 1), base alone | "
        f"{gen['base_s']:.2f} s | (same UNet) | median of {gen['repeats']} |",
        f"| 2. the same with a 0.7/0.3 blend of 2 adapters | {gen['tessera_blend_s']:.2f} s "
        f"(**{gen['tessera_blend_ratio']:.3f}x** the base; aim <= {AIM}x) | unfused "
        f"`set_adapters`: {gen['diffusers_unfused_s']:.2f} s "
        f"({gen['diffusers_unfused_ratio']:.3f}x); "
        f"`fuse_lora`: {gen['diffusers_fused_s']:.2f} s ({gen['diffusers_fused_ratio']:.3f}x) | "
        f"Tessera unmerged; fusing costs diffusers {gen['diffusers_fuse_s']:.2f} s, unfusing "
        f"{gen['diffusers_unfuse_s']:.2f} s, per change of mix |",
        f"| 3. memory per cached adapter, accounted | {_mib(memory['tessera_accounted_bytes'])} "
        f"MiB | {_mib(memory['diffusers_accounted_bytes'])} MiB (its LoRA parameters) | "
        f"{report['dtype']} tensors on the model's device |",
        f"| 3. {growth} per adapter cached / loaded | "
        f"{_mib(memory['tessera_growth_per_adapter'])} MiB (over {memory['tessera_cached']}) | "
        f"{_mib(memory['diffusers_growth_per_adapter'])} MiB (over "
        f"{memory['diffusers_loaded']}) | |",
        f"| 3. one merged 2-adapter mix (the old design) | {_mib(memory['merged_mix_bytes'])} "
        f"MiB ({_mib(memory['merged_mix_growth'])} MiB {growth}), merged in "
        f"{memory['merge_s']:.2f} s | | a copy of every weight the mix touches |",
    ]
    for row in report["switch"]:
        theirs = row["diffusers"]
        their_text = (
            f"{ms(theirs['median_s'])} ms"
            if theirs
            else f"not measured (loaded only up to {report['diffusers_max']})"
        )
        lines.append(
            f"| 4. switch between cached 2-adapter mixes, {row['cached_adapters']} cached | "
            f"{ms(row['tessera']['median_s'])} ms | {their_text} | median of "
            f"{row['tessera']['n']} switches |"
        )
    lines += [
        f"| 5. cold load of one adapter | {ms(cold['tessera']['median_s'])} ms "
        f"(validate + place, {cold['file_bytes'] / 1e6:.1f} MB file) | "
        f"{ms(cold['diffusers']['median_s'])} ms (`load_lora_weights` from a file) | median of "
        f"{cold['tessera']['n']} |",
        "",
        "## Details",
        "",
        "- **Training**: the step alone on both sides: Tessera's is `train_lora` with 1 step "
        "minus the same with 0 steps; diffusers' is noise, UNet forward, MSE, backward and "
        "AdamW as in its train_text_to_image_lora.py, with the latents and text embeddings "
        "computed once (the script recomputes them every step). Trainable LoRA parameters: "
        f"Tessera {train['tessera_lora_parameters']:,}, diffusers "
        f"{train['diffusers_lora_parameters']:,}.",
        "- **Generation**: `generate(..., steps=2, stop_step=1)` (one DDIM step, guidance 3, "
        "so the UNet sees batch 2), the same loop for every row; diffusers' UNet holds every "
        "adapter loaded for (4), two of them active. After one warm-up each, the four runs "
        "are interleaved. Largest difference of the latents to Tessera's blend: unfused "
        f"{gen['difference_to_tessera']['diffusers_unfused']:.1e}, fused "
        f"{gen['difference_to_tessera']['diffusers_fused']:.1e} (the blend itself moves them "
        f"by {gen['blend_effect']:.1e}): the same computation.",
        f"- **Memory**: Tessera's accounted bytes are `CachedAdapter.nbytes` (what the "
        f"byte-budgeted `AdapterCache` counts; {_mib(memory['tessera_cache_bytes'])} MiB for "
        f"{memory['tessera_cached']} adapters); the {growth} is the difference from the first "
        "adapter to the last, divided by their number. A mix is served unmerged and owns no "
        "memory of its own.",
        "- **Switching**: the same random sequence of mixes for both; Tessera: "
        "`AdapterCache.mix` (all adapters cached) and entering `use_mix`, what a job does "
        f"before its first step; diffusers: `set_adapters`. diffusers was loaded up to "
        f"{report['diffusers_max']} adapters (`--diffusers-max`): each `load_lora_weights` "
        "gets slower as adapters accumulate (the last load of each row: "
        + ", ".join(
            f"{row['cached_adapters']}: {ms(row['diffusers_last_load_s'])} ms"
            for row in report["switch"]
            if row["diffusers"]
        )
        + f"). Tessera's misses from the object store (DB row, S3 GET, sha256, validation, "
        f"placing): median {ms(memory['tessera_get_miss']['median_s'])} ms over "
        f"{memory['tessera_get_miss']['n']}.",
        "- **Cold load**: Tessera reads its own wire file (fp16, validated against the base's "
        "LoRA spec, cast to the model's dtype and device); diffusers reads the same adapter "
        f"exported to its layout ({cold['diffusers_file_bytes'] / 1e6:.1f} MB) into a UNet "
        "with no other adapter.",
        "",
        f"![switch time and blend overhead]({NAME}.png)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, marker in (("tessera", "o"), ("diffusers", "s")):
        rows = [row for row in report["switch"] if row[system]]
        left.plot(
            [row["cached_adapters"] for row in rows],
            [row[system]["median_s"] * 1e3 for row in rows],
            marker=marker,
            label=system,
        )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="cached adapters",
        ylabel="ms per switch (median)",
        title="switching between cached 2-adapter mixes",
    )
    left.legend()
    left.grid(True, which="both", alpha=0.3)
    gen = report["generation"]
    labels = ["Tessera\n(unmerged)", "diffusers\nset_adapters", "diffusers\nfuse_lora"]
    keys = ["tessera_blend_ratio", "diffusers_unfused_ratio", "diffusers_fused_ratio"]
    right.bar(labels, [gen[key] for key in keys], color=["C0", "C1", "C1"])
    right.axhline(1.0, color="black", linewidth=1)
    right.axhline(AIM, color="grey", linestyle="--", linewidth=1, label=f"aim: {AIM}x")
    right.set(ylabel="time / base alone", title="one generation step, 2-adapter blend")
    right.legend()
    figure.suptitle(f"{report['model']['what']}, {report['device']} {report['dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="model folder (built if missing)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="when building")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="generation runs per variant")
    parser.add_argument("--train-repeats", type=int, default=2, help="training steps per system")
    parser.add_argument("--switches", type=int, default=SWITCHES)
    parser.add_argument("--counts", type=int, nargs="+", default=list(CACHED_COUNTS))
    parser.add_argument("--diffusers-max", type=int, default=DIFFUSERS_MAX)
    parser.add_argument("--cold-loads", type=int, default=COLD_LOADS)
    common_arguments(parser)
    args = parser.parse_args(argv)
    if args.report_only:
        report = json.loads((args.out / f"{NAME}.json").read_text())
        write_report(report, args.out, NAME, markdown=markdown, plot=plot)
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(args.model or Path(scratch) / "sd1", args.size)
        started = time.perf_counter()
        report = run(args, folder)
    report["wall_s"] = time.perf_counter() - started
    write_report(report, args.out, NAME, markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
