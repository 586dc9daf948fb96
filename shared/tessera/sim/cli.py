"""`tessera simulate`: virtual devices against live (or freshly started) services."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tessera.sim.run import METHODS, Buffering, SimConfig, Stragglers, simulate
from tessera.sim.stack import run_on_fresh_stack


@click.command(name="simulate")
@click.option("--devices", default=12, show_default=True)
@click.option("--styles", default=3, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="exact", show_default=True)
@click.option(
    "--steps", default=SimConfig.steps, show_default=True, help="Training steps per round."
)
@click.option(
    "--samples", default=SimConfig.samples, show_default=True, help="Images each device owns."
)
@click.option(
    "--hybrid-images",
    default=0,
    show_default=True,
    help="Per round, images of the equal hybrid of two styles' adapters, scored for both looks.",
)
@click.option(
    "--slow-devices",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="How many devices (the first enrolled) are slow.",
)
@click.option(
    "--slow-factor",
    type=click.FloatRange(min=1.0, max=100.0),
    default=1.0,
    show_default=True,
    help="A slow device's training takes this many times as long (it waits the rest).",
)
@click.option(
    "--mode",
    type=click.Choice(["sync", "buffered"]),
    default="sync",
    show_default=True,
    help="sync: rounds that wait for every device; buffered: one round in which each cluster "
    "publishes a version every --buffer-k updates and devices train again at once.",
)
@click.option(
    "--buffer-k",
    type=click.IntRange(min=1, max=10_000),
    default=None,
    help="buffered: a cluster's updates per version (default: a quarter of the devices).",
)
@click.option(
    "--buffer-versions",
    type=click.IntRange(min=0, max=10_000),
    default=0,
    show_default=True,
    help="buffered: versions after which the round ends (0: rounds x devices / buffer-k).",
)
@click.option("--workers", default=2, show_default=True, help="Device processes at once.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--embedded/--running",
    default=True,
    show_default=True,
    help="Start a fresh stack on embedded servers, or use the one the settings point at.",
)
@click.option(
    "--model",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Base model folder for the fresh stack and the devices (default: TESSERA_BASE_MODEL).",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path(".tessera-sim")
)
def simulate_cmd(
    devices: int,
    styles: int,
    rounds: int,
    method: str,
    steps: int,
    samples: int,
    hybrid_images: int,
    slow_devices: int,
    slow_factor: float,
    mode: str,
    buffer_k: int | None,
    buffer_versions: int,
    workers: int,
    seed: int,
    embedded: bool,
    model: str | None,
    out: Path,
) -> None:
    """N virtual devices, K styles, R rounds, over HTTP; prints per-round figures."""
    from tessera.sim.report import cluster_table, comparison_table

    if mode == "buffered" and method == "secure":
        raise click.UsageError("--mode buffered runs method exact or fedavg, not secure")
    config = SimConfig(
        devices=devices,
        styles=styles,
        rounds=rounds,
        method=method,  # type: ignore[arg-type]
        steps=steps,
        samples=samples,
        hybrid_images=hybrid_images,
        workers=workers,
        seed=seed,
        model=model or "",
        lam=0.0 if method == "secure" else SimConfig.lam,  # secure rounds have no interaction
    )
    stragglers = Stragglers(devices=slow_devices, factor=slow_factor)
    buffering = None
    if mode == "buffered":
        buffering = Buffering(k=buffer_k or max(1, devices // 4), versions=buffer_versions)
    if embedded:
        report = run_on_fresh_stack(
            config, out / "stack", stragglers=stragglers, buffering=buffering
        )
    else:
        from tessera.config import get_settings

        settings = get_settings()
        report = simulate(
            config,
            aggregator_url=settings.aggregator_url,
            clustering_url=settings.clustering_url,
            operator_token=settings.operator_token.get_secret_value(),
            work_dir=out / "devices",
            log=click.echo,
            stragglers=stragglers,
            buffering=buffering,
        )
    click.echo(cluster_table(report))
    click.echo(comparison_table({method: report}))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"simulation-{method}.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    click.echo(f"report written to {out / f'simulation-{method}.json'}")
