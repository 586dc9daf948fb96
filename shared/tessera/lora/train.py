"""LoRA fine-tuning of the base UNet with peft, and its held-out loss.

`train_lora` adds a peft LoRA to the loaded UNet (the layers of the base's target preset),
trains it and removes it again, returning the adapter as data: the base model is unchanged
afterwards and is never copied. Images are encoded once (VAE latents with the scaling factor,
or the pixels of a pixel-space model); the loss target follows the scheduler's
`prediction_type` (epsilon, v_prediction, sample). On a GPU the UNet stays in its dtype and the
LoRA trains in float32 under autocast. Deterministic for a seed on the CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tessera.lora.adapter import A_SUFFIX, B_SUFFIX, LoraAdapter
from tessera.lora.mixing import check_compatible, install_mixing, merge_mix, use_mix
from tessera.model.base import BaseModel
from tessera.model.conditioning import Conditioning
from tessera.model.generate import as_conditioning, predict
from tessera.model.latents import encode_images

ADAPTER_NAME = "tessera_training"


@dataclass(frozen=True)
class TrainResult:
    """The trained adapter, its loss at every step and the wall time."""

    adapter: LoraAdapter
    losses: list[float]
    seconds: float


def train_lora(
    base: BaseModel,
    images: torch.Tensor,
    token_embeds: Conditioning | torch.Tensor,
    *,
    init: LoraAdapter | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    steps: int = 200,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    caption_dropout: float = 0.1,
    gradient_checkpointing: bool = False,
    progress: bool = False,
    train_a: bool = True,
) -> TrainResult:
    """Fine-tune a LoRA on `images` [n, 3, H, W] in [-1, 1] (any size: resized and
    centre-cropped to the model's resolution) captioned by the model's conditioning of each.

    Starts from `init` (e.g. the device's cluster adapter; its rank and alpha are kept) or from
    peft's default (A random, B zero: the adapter starts as a no-op). A `caption_dropout` share
    of each batch is trained on the empty prompt, so the adapter also shapes the unconditional
    branch that classifier-free guidance uses. With `train_a` False, A stays `init`'s (secure
    aggregation's frozen A, `tessera.secagg.vector.frozen_a`) and only B trains.
    """
    from peft import LoraConfig
    from tqdm.auto import tqdm

    rank, alpha = _rank_alpha(init, rank, alpha)
    if not train_a and init is None:
        raise ValueError("training B alone needs an init adapter holding the frozen A")
    captions = as_conditioning(token_embeds)
    _check_data(base, images, captions)
    spec = base.lora_spec
    if init is not None:
        check_compatible(init, spec)
    latents = encode_images(base, images)
    empty = base.prompts.empty()
    generator = torch.Generator().manual_seed(seed)
    scheduler = base.noise_scheduler
    unet = base.unet
    n = latents.shape[0]
    losses: list[float] = []
    start = time.perf_counter()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(spec.modules))  # type: ignore[arg-type]
    with _peft_adapter(base, config, seed, gradient_checkpointing) as params:
        if init is not None:
            _load_into(unet, init)
        if not train_a:
            params = _freeze_a(unet, params)
        optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for _ in tqdm(range(steps), desc="lora", disable=not progress, unit="step"):
            pick = torch.randint(0, n, (batch_size,), generator=generator)
            x = latents[pick]
            drop = torch.rand(batch_size, generator=generator) < caption_dropout
            context = _dropped(captions.rows(pick), empty, drop)
            noise = torch.randn(x.shape, generator=generator)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
            )
            noisy = scheduler.add_noise(x, noise, t)
            target = loss_target(scheduler, x, noise, t)
            with _autocast(base):
                pred = predict(
                    base,
                    noisy.to(base.device),
                    t.to(base.device),
                    context.to(base.device, base.dtype),
                )
            loss = torch.nn.functional.mse_loss(pred.float(), target.to(base.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.item()))
        tensors = _extract(unet, list(spec.modules))
    adapter = LoraAdapter(
        tensors=tensors,
        rank=rank,
        alpha=alpha,
        base_model_id=spec.base_model_id,
        base_model_hash=spec.base_model_hash,
        targets=spec.targets,
    )
    return TrainResult(adapter=adapter, losses=losses, seconds=time.perf_counter() - start)


def loss_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict under the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        velocity: torch.Tensor = scheduler.get_velocity(latents, noise, t)
        return velocity
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


@contextlib.contextmanager
def _peft_adapter(
    base: BaseModel, config: Any, seed: int, checkpointing: bool
) -> Iterator[list[torch.nn.Parameter]]:
    """A trainable peft LoRA on the base UNet for the block; removed after, even on error."""
    unet = base.unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        for param in params:  # LoRA weights in float32 whatever the UNet's dtype
            param.data = param.data.float()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        yield params
    finally:
        unet.eval()
        if checkpointing:
            unet.disable_gradient_checkpointing()
        unet.unload_lora()
        unet.requires_grad_(False)


def _freeze_a(unet: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Stop training every LoRA A; the parameters left to train (the B factors)."""
    frozen = {
        id(param) for name, param in unet.named_parameters() if f"lora_A.{ADAPTER_NAME}" in name
    }
    for param in params:
        if id(param) in frozen:
            param.requires_grad_(False)
    return [param for param in params if id(param) not in frozen]


def _autocast(base: BaseModel) -> contextlib.AbstractContextManager[Any]:
    if base.device.type == "cpu" or base.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(base.device.type, dtype=base.dtype)


def _dropped(captions: Conditioning, empty: Conditioning, drop: torch.Tensor) -> Conditioning:
    """The batch's captions with the empty prompt where `drop` is set."""
    embeds = captions.embeds.float().clone()
    embeds[drop] = empty.embeds[0].float()
    pooled = None
    if captions.pooled is not None and empty.pooled is not None:
        pooled = captions.pooled.float().clone()
        pooled[drop] = empty.pooled[0].float()
    return Conditioning(embeds, pooled)


@torch.no_grad()
def denoising_loss(
    base: BaseModel,
    images: torch.Tensor,
    token_embeds: Conditioning | torch.Tensor,
    adapter: LoraAdapter | None = None,
    *,
    seed: int = 0,
    repeats: int = 4,
) -> float:
    """Mean MSE to the loss target on held-out images at seeded timesteps: lower fits better."""
    captions = as_conditioning(token_embeds)
    _check_data(base, images, captions)
    latents = encode_images(base, images)
    merged = None
    if adapter is not None:
        install_mixing(base.unet, base.lora_spec)
        merged = merge_mix(base.unet, base.lora_spec, [(adapter, 1.0)])
    scheduler = base.noise_scheduler
    generator = torch.Generator().manual_seed(seed)
    context = captions.to(base.device, base.dtype)
    total = 0.0
    with use_mix(merged):
        for _ in range(repeats):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
            )
            noisy = scheduler.add_noise(latents, noise, t).to(base.device)
            pred = predict(base, noisy, t.to(base.device), context)
            target = loss_target(scheduler, latents, noise, t)
            total += float(torch.nn.functional.mse_loss(pred.float().cpu(), target))
    return total / repeats


def _rank_alpha(
    init: LoraAdapter | None, rank: int | None, alpha: float | None
) -> tuple[int, float]:
    if init is not None:
        if rank is not None and rank != init.rank:
            raise ValueError(f"rank {rank} differs from the init adapter's rank {init.rank}")
        rank, alpha = init.rank, init.alpha if alpha is None else alpha
    rank = 8 if rank is None else rank
    alpha = float(rank if alpha is None else alpha)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, found {rank}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, found {alpha}")
    return rank, alpha


def _check_data(base: BaseModel, images: torch.Tensor, captions: Conditioning) -> None:
    from tessera.model.generate import check_conditioning

    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images must be [n, 3, H, W] RGB in [-1, 1], found {list(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(
            f"one caption per image: {images.shape[0]} images, {len(captions)} captions"
        )
    check_conditioning(base, captions, "captions")


def _load_into(unet: torch.nn.Module, adapter: LoraAdapter) -> None:
    """Copy the init's A and B in; directions that are zero in both keep peft's random A.

    An aggregated adapter re-factorised below its rank has all-zero rows of A with all-zero
    columns of B; such a direction would get no gradient in either factor and stay dead.
    A random A row under a zero B column leaves the product, hence the start, unchanged.
    """
    with torch.no_grad():
        for module, a, b in adapter.pairs():
            layer: Any = unet.get_submodule(module)  # a peft LoRA layer
            lora_a = layer.lora_A[ADAPTER_NAME].weight
            dead = (a.flatten(1).abs().sum(dim=1) == 0) & (b.flatten(1).abs().sum(dim=0) == 0)
            keep = dead.view(-1, *([1] * (a.ndim - 1)))
            lora_a.copy_(torch.where(keep, lora_a, a.to(lora_a.dtype)))
            layer.lora_B[ADAPTER_NAME].weight.copy_(b)


def _extract(unet: torch.nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        layer: Any = unet.get_submodule(module)  # a peft LoRA layer
        tensors[module + A_SUFFIX] = (
            layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone()
        )
        tensors[module + B_SUFFIX] = (
            layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone()
        )
    return tensors
