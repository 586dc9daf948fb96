"""Speed of the model library on this machine: one LoRA training step and one generation.

    python bench/model_speed.py --out docs

Times one `train_lora` step at batch 1 and 16 and one 20-step generation (guidance 3, so two
UNet passes per step) at batch 1 and 16, base alone and with a 2-adapter blend. Reports the
median of `--repeats` runs after one warm-up. Writes docs/bench_model.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tessera.data import style_dataset, to_tensor
from tessera.lora import random_adapter
from tessera.lora.train import train_lora
from tessera.model.base import load_base_model
from tessera.model.generate import generate


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median, min and max wall seconds of `repeats` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--model", type=Path, default=None, help="default: TESSERA_BASE_MODEL")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_base_model(args.model)
    resolution = base.facts.resolution
    data = style_dataset("stripes", 16, 0)
    images = to_tensor(data.images)
    captions = base.prompts.encode(data.captions)
    spec = base.lora_spec
    blend = [
        (random_adapter(spec, 8, 8.0, seed=1), 0.5),
        (random_adapter(spec, 8, 8.0, seed=2), 0.5),
    ]
    rows: list[dict[str, Any]] = []
    for batch in (1, 16):
        # train_lora with 1 step includes attaching and removing peft: time 1 and 3 steps
        # and take the difference per step, which is the step itself.
        one = timed(
            partial(train_lora, base, images, captions, steps=1, batch_size=batch), args.repeats
        )
        three = timed(
            partial(train_lora, base, images, captions, steps=3, batch_size=batch), args.repeats
        )
        step = (three["median_s"] - one["median_s"]) / 2
        rows.append(
            {
                "what": "LoRA training step (rank 8)",
                "batch": batch,
                "median_s": step,
                "setup_s": one["median_s"] - step,
            }
        )
    for batch in (1, 16):
        prompt = captions.rows(slice(0, batch))
        for label, mix in (("base, no adapter", []), ("2-adapter blend", blend)):
            result = timed(partial(generate, base, prompt, mix, steps=20), args.repeats)
            rows.append({"what": f"20-step generation, {label}", "batch": batch, **result})
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, model on {base.device.type}; load average at the end {load} (this "
        "benchmark alone keeps it near 2)"
    )
    model = {"id": base.model_id, "family": base.facts.family, "resolution": resolution}
    report = {"machine": machine, "torch": torch.__version__, "model": model, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_model.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Model speed (`make bench`: bench/model_speed.py)",
        "",
        f"Measured on this machine: {machine}, torch {torch.__version__}; median of "
        f"{args.repeats} runs after a warm-up. Model {base.model_id} ({base.facts.family}, "
        f"{resolution}x{resolution}, {base.dtype}); generation uses guidance 3 (two UNet "
        "passes per step).",
        "",
        "| what | batch | median seconds | per image |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['what']} | {row['batch']} | {row['median_s']:.3f} | "
            f"{row['median_s'] / row['batch']:.4f} |"
        )
    setup = [r["setup_s"] for r in rows if "setup_s" in r]
    lines += [
        "",
        f"`train_lora` also spends {statistics.median(setup):.3f} s once per call "
        "attaching and removing the peft layers.",
        "",
    ]
    (args.out / "bench_model.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
