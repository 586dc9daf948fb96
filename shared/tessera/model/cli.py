"""`tessera model ...`: inspect a base model folder and keep its facts beside it."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group(name="model")
def model_group() -> None:
    """Base models: diffusers folders of SD-1.x, SD-2.x, SDXL or the bundled tiny model."""


@model_group.command(name="inspect")
@click.argument("folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--write/--no-write", default=True, help="Keep the facts in FOLDER/tessera.json.")
def inspect(folder: Path, write: bool) -> None:
    """Compute a model's facts (LoRA targets, conditioning, latents, fingerprint) once.

    Reads configs and weight files only; no model is run. The services read these facts
    instead of loading the weights.
    """
    from tessera.model.facts import inspect_model, write_facts
    from tessera.model.layout import ModelFolderError

    try:
        facts = inspect_model(folder)
    except (ModelFolderError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    summary = {k: v for k, v in facts.to_json().items() if k not in ("lora", "unet_files")}
    summary["lora_modules"] = {preset: len(modules) for preset, modules in facts.lora.items()}
    click.echo(json.dumps(summary, indent=2))
    if write:
        click.echo(f"facts written to {write_facts(folder, facts)}")
