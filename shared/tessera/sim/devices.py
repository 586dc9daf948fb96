"""One virtual device's round: sync, train and evaluate in a pool process, then wait out a slow
chip's extra time and upload in the caller's thread (`finish_device_round`), so that a slow
device's wait holds no pool process that other devices need.

Everything a job needs travels in `DeviceJob` (plain data), so the pool can use `spawn` and a
process rebuilds its device from the style, index and seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from tessera.data import DeviceProfile, make_device, to_tensor
from tessera.lora import LoraAdapter
from tessera.model.base import BaseModel, load_base_model

SECURE_TIMEOUT_S = 600.0  # how long a device waits for its cluster's next phase
SECURE_POLL_S = 0.5  # how often it asks
_BASE_LOCK = threading.Lock()


@dataclass(frozen=True)
class DeviceJob:
    """What a pool process needs for one device's round (`round_id` None: local only)."""

    aggregator_url: str
    token: str
    client_id: int
    state_dir: str
    style: str
    index: int
    seed: int
    round_number: int
    round_id: int | None
    steps: int
    batch_size: int
    lr: float
    rank: int
    samples: int
    eval_images: int
    eval_steps: int
    model: str = ""  # the base model folder; empty: TESSERA_BASE_MODEL
    compute_factor: float = 1.0  # a slow chip: training takes this many times as long
    secure: bool = False  # a secure round: train B on the frozen A, send it masked


@dataclass(frozen=True)
class DeviceRoundResult:
    """What one device measured this round."""

    client_id: int
    style: str
    cluster: int | None
    start_version_id: int | None
    train_seconds: float
    compute_seconds: float  # train_seconds times the job's compute_factor: what it waited
    train_loss: float
    heldout_loss: float
    style_share: float
    content_accuracy: float
    bytes_up: int
    bytes_down: int
    adapter: LoraAdapter | None = None  # the trained update, until `finish_device_round` sends it


def init_process(threads: int) -> None:
    """Pool initialiser: a fixed number of torch threads per process, quiet libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)


@lru_cache(maxsize=1)
def cached_base(model: str) -> BaseModel:
    """The base model of a process, loaded once (`model` empty: TESSERA_BASE_MODEL)."""
    return load_base_model(model or None)


@lru_cache(maxsize=64)
def _profile(style: str, index: int, seed: int) -> DeviceProfile:
    return make_device(style, index, seed)


def simulate_compute(train_seconds: float, *, factor: float) -> float:
    """Make training look `factor` times as slow as it ran (a slower chip) by waiting the
    difference; return the simulated compute time."""
    if not (math.isfinite(factor) and factor >= 1.0):
        raise ValueError(f"a compute factor is at least 1 (a slower chip), found {factor}")
    time.sleep(train_seconds * (factor - 1.0))
    return train_seconds * factor


def run_device_round(job: DeviceJob) -> DeviceRoundResult:
    """Sync from the server (or the device's own adapter when local), train, evaluate; the
    update is sent by `finish_device_round`. In a secure round the device trains only B, from
    its cluster's frozen A for the round."""
    from tessera.data.evaluator import default_evaluator
    from tessera.lora.train import denoising_loss
    from tessera.model.latents import fit_images
    from tessera.sdk.device import DeviceClient
    from tessera.sdk.secure import SecureRound

    base = cached_base(job.model)
    profile = _profile(job.style, job.index, job.seed)
    client = DeviceClient(
        aggregator_url=job.aggregator_url,
        token=job.token,
        client_id=job.client_id,
        state_dir=Path(job.state_dir),
        base=base,
    )
    if job.round_id is None:
        start, start_version, cluster = client.personal, None, None
    else:
        synced = client.sync()
        start, start_version, cluster = (
            synced.start_adapter,
            synced.start_version_id,
            synced.cluster,
        )
    if job.secure:
        if job.round_id is None:
            raise ValueError("a secure round needs a round")
        start = SecureRound(client, job.round_id, spec=base.lora_spec).start_adapter(start)
    batch = profile.samples(job.samples, seed=job.seed)  # the device's own images, every round
    result = client.train(
        to_tensor(batch.images),  # 32x32 renderings; train_lora resizes to the model's size
        client.encode(batch.captions),
        start=start,
        rank=job.rank if start is None else None,
        steps=job.steps,
        batch_size=job.batch_size,
        lr=job.lr,
        seed=job.seed * 1000 + job.round_number,
        train_a=not job.secure,
    )
    train_loss = float(sum(result.losses[-10:]) / len(result.losses[-10:]))
    heldout = profile.heldout(job.eval_images, seed=job.seed)
    held_images = to_tensor(heldout.images)
    held_captions = client.encode(heldout.captions)
    loss = denoising_loss(base, held_images, held_captions, result.adapter, seed=job.seed)
    images = client.generate(
        heldout.captions, adapter=result.adapter, steps=job.eval_steps, seed=job.seed
    ).images
    assert images is not None
    evaluator = default_evaluator()
    scores = evaluator.evaluate(
        fit_images(images, evaluator.config.image_size),  # the model's resolution to its own
        style=profile.style,
        content=list(zip(heldout.shapes, heldout.colours, strict=True)),
    )
    return DeviceRoundResult(
        client_id=job.client_id,
        style=job.style,
        cluster=cluster,
        start_version_id=start_version,
        train_seconds=result.seconds,
        compute_seconds=result.seconds,
        train_loss=train_loss,
        heldout_loss=loss,
        style_share=float(scores.style_share or 0.0),
        content_accuracy=float(scores.content_accuracy or 0.0),
        bytes_up=client.traffic.up,
        bytes_down=client.traffic.down,
        adapter=result.adapter,
    )


def finish_device_round(job: DeviceJob, result: DeviceRoundResult) -> DeviceRoundResult:
    """Wait out the rest of a slow chip's compute time, then send the update (with the version
    it trained from) unless the round is local; the result with its compute time and traffic.
    In a secure round the update goes through the protocol (`SecureRound.run`: keys, shares,
    masked input, unmasking), which waits for the cluster's other devices between phases, so
    each device's must run in a thread of its own, outside the pool.

    Raises `tessera.sdk.http.ApiError` when the aggregator refuses the update (409: the round
    stopped collecting)."""
    from tessera.sdk.device import DeviceClient
    from tessera.sdk.secure import SecureRound

    compute_seconds = simulate_compute(result.train_seconds, factor=job.compute_factor)
    done = dataclasses.replace(result, compute_seconds=compute_seconds, adapter=None)
    if job.round_id is None or result.adapter is None:
        return done
    client = DeviceClient(
        aggregator_url=job.aggregator_url, token=job.token, client_id=job.client_id
    )
    try:
        if job.secure:
            with _BASE_LOCK:  # the devices' threads of this process share one base model
                spec = cached_base(job.model).lora_spec
            secure = SecureRound(client, job.round_id, spec=spec)
            secure.run(
                result.adapter,
                num_samples=job.samples,
                timeout_s=SECURE_TIMEOUT_S,
                poll_s=SECURE_POLL_S,
            )
        else:
            client.upload_update(
                job.round_id,
                result.adapter,
                num_samples=job.samples,
                base_version_id=result.start_version_id,
                train_loss=result.train_loss,
            )
    finally:
        client.http.close()
        client.downloads.close()
    return dataclasses.replace(
        done,
        bytes_up=done.bytes_up + client.traffic.up,
        bytes_down=done.bytes_down + client.traffic.down,
    )
