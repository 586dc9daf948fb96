"""`tessera device ...`: what an edge device runs, on top of `DeviceClient`.

State (identity, token, personal adapter, cached cluster adapters) lives in `--dir`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from tessera.sdk.http import ApiError

if TYPE_CHECKING:
    import torch

    from tessera.sdk.device import DeviceClient

DEFAULT_DIR = ".tessera-device"
dir_option = click.option(
    "--dir",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="The device's state folder.",
)


@click.group(name="device")
def device_group() -> None:
    """Edge device: enrol, encode task descriptions, sync, train, generate, finish."""


def _load(state_dir: Path) -> DeviceClient:
    from tessera.sdk.device import DeviceClient

    try:
        return DeviceClient.load(state_dir)
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None


def _fail(error: ApiError) -> click.ClickException:
    return click.ClickException(f"the server refused: {error}")


@device_group.command(name="enrol")
@click.argument("name")
@click.option("--aggregator", default=None, help="Aggregator URL (default: the settings').")
@click.option("--operator-token", default=None, help="Operator token (default: the settings').")
@dir_option
def enrol(name: str, aggregator: str | None, operator_token: str | None, state_dir: Path) -> None:
    """Register this device; its token is kept in --dir (mode 600)."""
    from tessera.config import get_settings
    from tessera.sdk.device import DeviceClient

    settings = get_settings()
    try:
        device = DeviceClient.enrol(
            aggregator_url=aggregator or settings.aggregator_url,
            operator_token=operator_token or settings.operator_token.get_secret_value(),
            name=name,
            state_dir=state_dir,
        )
    except ApiError as error:
        raise _fail(error) from None
    click.echo(f"enrolled {name} as client {device.client_id}; state in {state_dir}")


@device_group.command(name="encode")
@click.argument("texts", nargs=-1, required=True)
@click.option("--upload/--no-upload", default=True, help="Upload the task vectors.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also save the model's conditioning of the first text (safetensors: prompt_embeds, "
    "and pooled_prompt_embeds for SDXL) for a generation request.",
)
@dir_option
def encode(texts: tuple[str, ...], upload: bool, out: Path | None, state_dir: Path) -> None:
    """Encode task descriptions here; only the vectors are uploaded."""
    device = _load(state_dir)
    vectors = device.task_vectors(texts)
    click.echo(f"encoded {len(texts)} texts: task vectors {list(vectors.shape)}")
    if out is not None:
        from safetensors.torch import save_file

        conditioning = device.encode(texts[:1])
        tensors = {"prompt_embeds": conditioning.embeds.half().contiguous()}
        if conditioning.pooled is not None:
            tensors["pooled_prompt_embeds"] = conditioning.pooled.half().contiguous()
        save_file(tensors, str(out))
        click.echo(f"conditioning {list(conditioning.embeds.shape)} (fp16) written to {out}")
    if upload:
        try:
            stored = device.upload_task_descriptions(texts)
        except ApiError as error:
            raise _fail(error) from None
        click.echo(json.dumps(stored, indent=2, default=str))


@device_group.command(name="sync")
@dir_option
def sync(state_dir: Path) -> None:
    """Show the assignment and download the adapter to start from."""
    device = _load(state_dir)
    try:
        synced = device.sync()
    except ApiError as error:
        raise _fail(error) from None
    round_ = synced.current_round
    click.echo(f"cluster: {synced.cluster}")
    click.echo(f"start adapter version: {synced.start_version_id or 'none (train from scratch)'}")
    click.echo(
        f"current round: {round_['id'] if round_ else 'none'}"
        + (f" ({round_['state']})" if round_ else "")
    )


@device_group.command(name="train")
@click.option("--style", default=None, help="Train on synthetic images of this style.")
@click.option(
    "--data",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="A folder of images (any size) with captions.jsonl, sidecar .txt files or captions.json.",
)
@click.option("--images", default=32, show_default=True, help="Synthetic images (with --style).")
@click.option("--steps", default=100, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--rank", default=8, show_default=True, help="Only when starting from scratch.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--gradient-checkpointing", is_flag=True, help="Trade compute for memory on a large UNet."
)
@click.option("--upload/--no-upload", default=True, help="Upload to the current round.")
@dir_option
def train(
    style: str | None,
    data: Path | None,
    images: int,
    steps: int,
    batch_size: int,
    lr: float,
    rank: int,
    seed: int,
    gradient_checkpointing: bool,
    upload: bool,
    state_dir: Path,
) -> None:
    """Train from the cluster's adapter on local images; keep it; upload it to the round."""
    if (style is None) == (data is None):
        raise click.UsageError("give exactly one of --style and --data")
    device = _load(state_dir)
    pixels, captions = _synthetic(style, images, seed) if style else _folder(device, data)  # type: ignore[arg-type]
    tokens = device.encode(captions)
    try:
        synced = device.sync()
    except ApiError as error:
        raise _fail(error) from None
    start = synced.start_adapter
    click.echo(
        f"starting from {'adapter version ' + str(synced.start_version_id) if start else 'scratch'}"
    )
    result = device.train(
        pixels,
        tokens,
        start=start,
        rank=None if start else rank,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
        progress=True,
    )
    loss = float(np.mean(result.losses[-10:]))
    click.echo(
        f"trained {steps} steps in {result.seconds:.1f}s, loss {loss:.4f}; personal adapter kept"
    )
    round_ = synced.current_round
    if not upload:
        return
    if round_ is None or round_["state"] != "collecting":
        click.echo("no round is collecting: nothing uploaded")
        return
    try:
        receipt = device.upload_update(
            round_["id"],
            result.adapter,
            num_samples=len(captions),
            base_version_id=synced.start_version_id,
            train_loss=loss,
        )
    except ApiError as error:
        raise _fail(error) from None
    click.echo(
        f"uploaded to round {round_['id']}: {receipt['size_bytes']} bytes, "
        f"round now {receipt['round_state']}"
    )


@device_group.command(name="generate")
@click.argument("prompts", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--steps", default=20, show_default=True)
@click.option("--guidance", default=3.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@dir_option
def generate_cmd(
    prompts: tuple[str, ...], out: Path, steps: int, guidance: float, seed: int, state_dir: Path
) -> None:
    """Generate on the device with its personal adapter; writes a PNG grid."""
    from tessera.lora.evidence import save_grid

    device = _load(state_dir)
    images = device.generate(prompts, steps=steps, guidance=guidance, seed=seed).images
    assert images is not None
    save_grid([images], ["personal" if device.personal else "base"], out)
    click.echo(f"{len(prompts)} images written to {out}")


@device_group.command(name="finish")
@click.argument("latents", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("prompts", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@dir_option
def finish(latents: Path, prompts: tuple[str, ...], out: Path, state_dir: Path) -> None:
    """Finish a split generation: the server's latents, the last steps here."""
    from tessera.lora.evidence import save_grid
    from tessera.model.generate import latents_from_bytes

    device = _load(state_dir)
    try:
        handoff = latents_from_bytes(latents.read_bytes())
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if handoff.latents.shape[0] != len(prompts):
        raise click.UsageError(
            f"the latents hold {handoff.latents.shape[0]} images; give that many prompts"
        )
    images = device.finish(
        prompts,
        handoff.latents,
        start_step=handoff.step,
        steps=handoff.steps,
        guidance=handoff.guidance,
        sampler=handoff.sampler,
    )
    save_grid([images], ["finished"], out)
    click.echo(
        f"ran steps {handoff.step + 1}..{handoff.steps} here; "
        f"{len(prompts)} images written to {out}"
    )


def _synthetic(style: str, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    from tessera.data import STYLES, style_dataset, to_tensor

    if style not in STYLES:
        raise click.UsageError(f"unknown style {style!r}; one of {', '.join(STYLES)}")
    batch = style_dataset(style, n, seed)
    return to_tensor(batch.images), list(batch.captions)


def _folder(device: DeviceClient, folder: Path) -> tuple[torch.Tensor, list[str]]:
    from tessera.data.captioned import CaptionedFolderError, load_captioned_folder

    try:
        return load_captioned_folder(folder, device.base.facts.resolution)
    except CaptionedFolderError as error:
        raise click.UsageError(str(error)) from None
