"""LoRA fine-tuning of the base UNet's attention projections with peft, and its held-out loss.

`train_lora` never changes the base model it is given: it trains a peft LoRA on a private copy
of the UNet and returns the adapter as data. Deterministic for a seed on the CPU.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from tessera.lora.adapter import A_SUFFIX, B_SUFFIX, LoraAdapter
from tessera.lora.mixing import check_compatible, install_mixing, merge_mix, use_mix
from tessera.model.base import BaseModel
from tessera.model.encoder import empty_prompt_embeds

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class TrainResult:
    """The trained adapter, its loss at every step and the wall time."""

    adapter: LoraAdapter
    losses: list[float]
    seconds: float


def train_lora(
    base: BaseModel,
    images: torch.Tensor,
    token_embeds: torch.Tensor,
    *,
    init: LoraAdapter | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    steps: int = 200,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    caption_dropout: float = 0.1,
    progress: bool = False,
) -> TrainResult:
    """Fine-tune a LoRA on `images` [n, 3, H, W] in [-1, 1] captioned by `token_embeds` [n, T, 384].

    Starts from `init` (e.g. the device's cluster adapter; its rank and alpha are kept) or from
    peft's default (A random, B zero: the adapter starts as a no-op). A `caption_dropout` share
    of each batch is trained on the empty prompt, so the adapter also shapes the unconditional
    branch that classifier-free guidance uses.
    """
    from peft import LoraConfig
    from tqdm.auto import tqdm

    rank, alpha = _rank_alpha(init, rank, alpha)
    _check_data(base, images, token_embeds)
    spec = base.lora_spec
    if init is not None:
        check_compatible(init, spec)
    device = base.device
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = copy.deepcopy(base.unet)
        unet.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(spec.modules))  # type: ignore[arg-type]
        unet.add_adapter(config)
    if init is not None:
        _load_into(unet, init)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = base.noise_scheduler
    n = images.shape[0]
    empty = empty_prompt_embeds(token_embeds.shape[1])[0]
    unet.train()
    losses: list[float] = []
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="lora", disable=not progress, unit="step"):
        pick = torch.randint(0, n, (batch_size,), generator=generator)
        x = images[pick].float()
        context = token_embeds[pick].float().clone()
        drop = torch.rand(batch_size, generator=generator) < caption_dropout
        context[drop] = empty
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        noisy = scheduler.add_noise(x, noise, t)
        pred = unet(noisy.to(device), t.to(device), context.to(device)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.item()))
    adapter = LoraAdapter(
        tensors=_extract(unet, list(spec.modules)),
        rank=rank,
        alpha=alpha,
        base_model_id=spec.base_model_id,
        base_model_hash=spec.base_model_hash,
    )
    return TrainResult(adapter=adapter, losses=losses, seconds=time.perf_counter() - start)


@torch.no_grad()
def denoising_loss(
    base: BaseModel,
    images: torch.Tensor,
    token_embeds: torch.Tensor,
    adapter: LoraAdapter | None = None,
    *,
    seed: int = 0,
    repeats: int = 4,
) -> float:
    """Mean epsilon-MSE on held-out images at seeded timesteps: lower means a better fit."""
    _check_data(base, images, token_embeds)
    merged = None
    if adapter is not None:
        install_mixing(base.unet, base.lora_spec)
        merged = merge_mix(base.unet, base.lora_spec, [(adapter, 1.0)])
    scheduler = base.noise_scheduler
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with use_mix(merged):
        for _ in range(repeats):
            noise = torch.randn(images.shape, generator=generator)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator
            )
            noisy = scheduler.add_noise(images.float(), noise, t).to(base.device)
            pred = base.unet(noisy, t.to(base.device), token_embeds.float().to(base.device)).sample
            total += float(torch.nn.functional.mse_loss(pred.float().cpu(), noise))
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


def _check_data(base: BaseModel, images: torch.Tensor, token_embeds: torch.Tensor) -> None:
    config = base.unet.config
    want = (int(config.in_channels), int(config.sample_size), int(config.sample_size))
    if images.ndim != 4 or tuple(images.shape[1:]) != want or images.shape[0] < 1:
        raise ValueError(
            f"images must be [n, {', '.join(map(str, want))}], found {list(images.shape)}"
        )
    width = int(config.cross_attention_dim)
    if (
        token_embeds.ndim != 3
        or token_embeds.shape[0] != images.shape[0]
        or token_embeds.shape[2] != width
    ):
        raise ValueError(
            f"token_embeds must be [{images.shape[0]}, T, {width}] (one per image), "
            f"found {list(token_embeds.shape)}"
        )


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
            dead = (a.abs().sum(dim=1) == 0) & (b.abs().sum(dim=0) == 0)
            lora_a.copy_(torch.where(dead.unsqueeze(1), lora_a, a.to(lora_a.dtype)))
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
