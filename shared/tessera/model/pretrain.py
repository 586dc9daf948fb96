"""Pretrain the bundled tiny base model on plain renderings of the synthetic captioned shapes.

python -m tessera.model.pretrain --steps 1500 --batch-size 32 --device cpu --out DIR

Without `--init` a fresh tiny model is written to DIR first; the trained UNet replaces it at
the end, with the facts (fingerprint) recomputed. Captions are conditioned by the model's own
text encoder (MiniLM token states).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tessera.data import COLOUR_NAMES, SHAPES, caption, pretraining_batch, to_tensor
from tessera.data.styles import PRETRAINING_LOOKS, look_caption
from tessera.model.base import (
    BUNDLED_MODEL,
    BaseModel,
    build_base_model,
    load_base_model,
    save_tiny_model,
)

if TYPE_CHECKING:
    from tessera.model.conditioning import PromptEncoder

ALL_CAPTIONS: tuple[str, ...] = (
    *(caption(s, c) for s in SHAPES for c in COLOUR_NAMES),
    *(look_caption(s, c, look) for look in PRETRAINING_LOOKS for s in SHAPES for c in COLOUR_NAMES),
)
EMPTY_CAPTION = ""


def caption_table(prompts: PromptEncoder) -> tuple[tuple[str, ...], torch.Tensor]:
    """Every pretraining caption plus the empty one (last), and the model's token states."""
    texts = (*ALL_CAPTIONS, EMPTY_CAPTION)
    return texts, prompts.encode(list(texts)).embeds


def load_caption_table(path: Path) -> tuple[tuple[str, ...], torch.Tensor]:
    """Caption token states precomputed by `save_caption_table` (for machines without MiniLM)."""
    raw = torch.load(path, map_location="cpu", weights_only=False)
    return tuple(raw["texts"]), raw["tokens"].float()


def save_caption_table(path: Path, prompts: PromptEncoder) -> None:
    """Encode the captions here and store them for a run elsewhere."""
    texts, tokens = caption_table(prompts)
    torch.save({"texts": list(texts), "tokens": tokens}, path)


def learning_rate(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pretrain(
    model: BaseModel,
    table: tuple[tuple[str, ...], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    dropout: float = 0.1,
    look_share: float = 0.0,
    offset_noise: float = 0.0,
    max_seconds: float | None = None,
) -> list[float]:
    """Denoising (epsilon) training with caption dropout for classifier-free guidance.

    `offset_noise` adds to each image's noise one Gaussian value per channel, times it (Guttenberg's
    offset noise). With independent per-pixel noise only, an image's mean colour is the last
    thing the noise hides and the first the sampler must invent, and an epsilon model learns to
    leave it near the data's average: the base drew plain backgrounds at 0.77 (trained on 0.98)
    and no LoRA could brighten them, so a light palette like pastel's lavender came out as a
    dark violet. The offset lets the model move an image's mean, and its samples' backgrounds
    follow the training images (docs/pretraining.md).
    """
    texts, tokens = table
    index = {text: i for i, text in enumerate(texts)}
    empty = index[EMPTY_CAPTION]
    tokens = tokens.to(device)
    unet = model.unet.to(device).train()
    unet.requires_grad_(True)  # a loaded base is frozen; pretraining trains all of it
    scheduler = model.noise_scheduler
    optimiser = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        batch = pretraining_batch(batch_size, seed=seed * 1_000_003 + step, look_share=look_share)
        images = to_tensor(batch.images)
        ids = torch.tensor([index[c] for c in batch.captions])
        drop = torch.rand(batch_size, generator=generator) < dropout
        ids = torch.where(drop, torch.full_like(ids, empty), ids)
        noise = torch.randn(images.shape, generator=generator)
        if offset_noise:
            shift = torch.randn(batch_size, images.shape[1], 1, 1, generator=generator)
            noise = noise + offset_noise * shift
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        noisy = scheduler.add_noise(images, noise, t)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        pred = unet(noisy.to(device), t.to(device), tokens[ids.to(device)]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step} loss {losses[-1]:.4f} {elapsed:.0f}s", flush=True)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            print(f"stopping at step {step + 1}: time limit {max_seconds:.0f}s", flush=True)
            break
    unet.eval()
    unet.requires_grad_(False)
    return losses


def earlier_runs(init: Path | None) -> list[dict]:
    """The runs recorded in the model folder this run continues from (oldest first)."""
    if init is None or not (init / "pretraining_log.json").exists():
        return []
    log = json.loads((init / "pretraining_log.json").read_text())
    return list(log["runs"]) if "runs" in log else [log]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train, then write weights, loss log and timing to --out."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument(
        "--look-share",
        type=float,
        default=0.5,
        help="share of each batch drawn in a pretraining look, with a caption naming it",
    )
    parser.add_argument(
        "--offset-noise",
        type=float,
        default=0.0,
        help="per-image, per-channel noise offset times this (0: off): the mean colour is learnt",
    )
    parser.add_argument("--caption-embeds", type=Path, default=None)
    parser.add_argument("--save-caption-embeds", type=Path, default=None)
    parser.add_argument("--init", type=Path, default=None, help="continue from this model folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.save_caption_embeds is not None:
        source = load_base_model(args.init or BUNDLED_MODEL, device="cpu", dtype="float32")
        save_caption_table(args.save_caption_embeds, source.prompts)
        return
    torch.manual_seed(args.seed)
    if args.init is None:
        model = build_base_model(args.out)
    else:
        model = load_base_model(args.init, device="cpu", dtype="float32")
    if args.caption_embeds is not None:
        table = load_caption_table(args.caption_embeds)
    else:
        table = caption_table(model.prompts)
    start = time.perf_counter()
    losses = pretrain(
        model,
        table,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        look_share=args.look_share,
        offset_noise=args.offset_noise,
        max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
    )
    wall = time.perf_counter() - start
    model.unet.to("cpu")
    run = {
        "steps": len(losses),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
        "look_share": args.look_share,
        "offset_noise": args.offset_noise,
        "wall_seconds": round(wall, 1),
        "seconds_per_step": round(wall / max(1, len(losses)), 4),
        "parameters": sum(p.numel() for p in model.unet.parameters()),
        "init": None if args.init is None else str(args.init),
    }
    runs = [*earlier_runs(args.init), {**run, "loss": losses}]
    meta = {"model_id": model.model_id, "pretraining": run}
    kept = args.out / "tessera.json"
    if args.init is not None and not kept.exists():  # keep what the init folder says of itself
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.init / "tessera.json", kept)
    save_tiny_model(model.unet, model.noise_scheduler, args.out, meta)
    (args.out / "pretraining_log.json").write_text(json.dumps({"runs": runs}) + "\n")
    print(json.dumps(run), flush=True)


if __name__ == "__main__":
    main()
