"""Checks of the base model: does it draw the captioned subject, and can a LoRA learn a style?

    python -m tessera.model.probe base --n 60 --grid docs/pretraining_samples.png
    python -m tessera.model.probe lora --style night --steps 250 --batch-size 16

A minimal stand-in for `train_lora` (built elsewhere): rank-r peft LoRA on the UNet attention
projections, trained on one style's images with their plain captions, then scored by the
evaluator against the same base model without the adapter.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tessera.data import caption, cycled_subjects, style_dataset, to_tensor
from tessera.data.tensors import to_uint8
from tessera.lora.adapter import TARGET_PRESETS
from tessera.model.base import BaseModel, load_base_model
from tessera.model.generate import generate


def eval_subjects(n: int, seed: int) -> list[tuple[str, str]]:
    """The probe's evaluation subjects: every subject in turn, in a seeded order."""
    return cycled_subjects(n, seed, "probe-subjects")


def generate_for(
    model: BaseModel, subjects: list[tuple[str, str]], steps: int, guidance: float, seed: int
) -> torch.Tensor:
    """Sample one image per subject from its plain caption (DDIM, guided against "")."""
    prompts = model.prompts.encode([caption(s, c) for s, c in subjects])
    images = generate(
        model, prompts, steps=steps, guidance=guidance, seed=seed, sampler="ddim"
    ).images
    assert images is not None
    return images


def save_grid(images: torch.Tensor, path: Path, columns: int = 10, scale: int = 3) -> None:
    """Write images as a PNG grid, upscaled `scale` times with nearest-neighbour."""
    from PIL import Image

    arrays = to_uint8(images)
    n, h, w, _ = arrays.shape
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 96, dtype=np.uint8)
    for i, image in enumerate(arrays):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = image
    big = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    big.save(path)


def check_base(model: BaseModel, n: int, steps: int, guidance: float, seed: int) -> dict:
    """Evaluator scores of `n` base samples against their captions and the plain style."""
    from tessera.data.evaluator import evaluate

    subjects = eval_subjects(n, seed)
    images = generate_for(model, subjects, steps, guidance, seed)
    scores = evaluate(images, style="plain", content=subjects)
    return {"images": images, "scores": scores.to_dict()}


def add_lora(model: BaseModel, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Freeze the UNet and attach a peft LoRA on its attention projections; its parameters."""
    from peft import LoraConfig

    model.unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        target_modules=list(TARGET_PRESETS["attention"]),
        init_lora_weights="gaussian",
    )
    model.unet.add_adapter(config)
    return [p for p in model.unet.parameters() if p.requires_grad]


def train_probe_lora(
    model: BaseModel,
    style: str,
    *,
    n_images: int,
    steps: int,
    batch_size: int,
    lr: float,
    rank: int,
    alpha: float,
    seed: int,
) -> dict:
    """Train the probe LoRA on `n_images` of one style; the loss curve and seconds per step."""
    torch.manual_seed(seed)
    data = style_dataset(style, n_images, seed)
    images = to_tensor(data.images)
    captions = sorted(set(data.captions))
    tokens = model.prompts.encode(captions).embeds
    ids = torch.tensor([captions.index(c) for c in data.captions])
    params = add_lora(model, rank, alpha)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = model.noise_scheduler
    generator = torch.Generator().manual_seed(seed)
    model.unet.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        pick = torch.randint(0, n_images, (batch_size,), generator=generator)
        x = images[pick]
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        pred = model.unet(scheduler.add_noise(x, noise, t), t, tokens[ids[pick]]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(
                f"lora step {step} loss {losses[-1]:.4f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    wall = time.perf_counter() - start
    model.unet.eval()
    n_params = sum(p.numel() for p in params)
    return {"losses": losses, "seconds_per_step": wall / steps, "lora_parameters": n_params}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point for the base check and the style probe."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("base", "lora"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=None)
    parser.add_argument("--style", default="night")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_base_model(args.model, device="cpu", dtype="float32")
    if args.mode == "base":
        result = check_base(model, args.n, args.sample_steps, args.guidance, args.seed)
        if args.grid is not None:
            save_grid(result.pop("images"), args.grid)
        report = result["scores"]
    else:
        from tessera.data.evaluator import evaluate

        subjects = eval_subjects(args.n, args.seed + 1)
        before = generate_for(model, subjects, args.sample_steps, args.guidance, args.seed)
        base_scores = evaluate(before, style=args.style, content=subjects).to_dict()
        trained = train_probe_lora(
            model,
            args.style,
            n_images=args.images,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            rank=args.rank,
            alpha=args.alpha,
            seed=args.seed,
        )
        after = generate_for(model, subjects, args.sample_steps, args.guidance, args.seed)
        lora_scores = evaluate(after, style=args.style, content=subjects).to_dict()
        if args.grid is not None:
            save_grid(torch.cat([before[:10], after[:10]]), args.grid)
        report = {
            "style": args.style,
            "rank": args.rank,
            "alpha": args.alpha,
            "lr": args.lr,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "images": args.images,
            "seconds_per_step": round(trained["seconds_per_step"], 3),
            "lora_parameters": trained["lora_parameters"],
            "final_loss": float(np.mean(trained["losses"][-20:])),
            "base": base_scores,
            "lora": lora_scores,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
