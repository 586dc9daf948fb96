"""`tessera simulate`: virtual devices against live (or freshly started) services."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tessera.sim.run import METHODS, SimConfig, SimReport, simulate

if TYPE_CHECKING:
    from tessera.stack import StackInfo


def run_on_fresh_stack(
    config: SimConfig,
    data_dir: Path,
    *,
    log: Callable[[str], None] = click.echo,
    after: Callable[[StackInfo], None] | None = None,
) -> SimReport:
    """Start a stack on embedded servers in `data_dir`, simulate, call `after(info)`, stop."""
    from tessera.demo import demo_settings
    from tessera.stack import Stack

    shutil.rmtree(data_dir, ignore_errors=True)
    settings = demo_settings(data_dir, **({"base_model": config.model} if config.model else {}))
    stack = Stack(settings)
    try:
        info = stack.start()
        log(f"   stack up ({', '.join(info.urls)}); logs in {info.log_dir}")
        report = simulate(
            config,
            aggregator_url=settings.aggregator_url,
            clustering_url=settings.clustering_url,
            operator_token=info.operator_token,
            work_dir=data_dir / "devices",
            log=log,
        )
        if after is not None:
            after(info)
        return report
    finally:
        stack.stop()


@click.command(name="simulate")
@click.option("--devices", default=12, show_default=True)
@click.option("--styles", default=3, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="exact", show_default=True)
@click.option(
    "--steps", default=SimConfig.steps, show_default=True, help="Training steps per round."
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
    default="",
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
    workers: int,
    seed: int,
    embedded: bool,
    model: str,
    out: Path,
) -> None:
    """N virtual devices, K styles, R rounds, over HTTP; prints per-round figures."""
    from tessera.sim.report import cluster_table, comparison_table

    config = SimConfig(
        devices=devices,
        styles=styles,
        rounds=rounds,
        method=method,  # type: ignore[arg-type]
        steps=steps,
        workers=workers,
        seed=seed,
        model=model,
    )
    if embedded:
        report = run_on_fresh_stack(config, out / "stack")
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
        )
    click.echo(cluster_table(report))
    click.echo(comparison_table({method: report}))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"simulation-{method}.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    click.echo(f"report written to {out / f'simulation-{method}.json'}")
