"""`make demo`: the whole system on embedded defaults, shown working, then stopped; and
`make console-demo`: the same federation on a stack left running for the operator console.

The same federation runs three times on fresh stacks, with the same devices, seeds and budget
per device: cluster-aware (Tessera), one global adapter by FedAvg, and every device alone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from tessera.config import Settings
from tessera.sim.run import SimConfig, SimReport
from tessera.stack import StackInfo

DEMO_CONFIG = SimConfig(
    devices=6,
    styles=3,
    # A texture, a stroke and a palette: the hybrid row stacks the first two, which change
    # different attributes, so an image can carry both (docs/lora_evidence.md, every pair).
    style_names=("stripes", "outline", "gradient"),
    rounds=4,
    steps=4,
    batch_size=4,
    lr=5e-3,
    samples=8,
    eval_images=3,
    eval_steps=12,
    workers=2,
)
DEMO_METHODS = {
    "exact": "cluster-aware (exact)",
    "global": "global FedAvg",
    "local": "local only",
}
TARGET = 0.8  # style accuracy the demo's headline counts rounds to


def run_demo(
    data_dir: str,
    config: SimConfig = DEMO_CONFIG,
    *,
    after: Callable[[StackInfo, SimReport], None] | None = None,
) -> dict[str, Any]:
    """Simulate the federation once per method on fresh stacks; print and write the results.
    `after(info, report)` runs while the cluster-aware run's stack is still up."""
    from tessera.sim.report import cluster_table, comparison_table, plot_convergence
    from tessera.sim.run import device_pool
    from tessera.sim.stack import run_on_fresh_stack

    folder = Path(data_dir).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    output = folder / "output"
    output.mkdir(parents=True)
    started = time.perf_counter()
    reports: dict[str, SimReport] = {}
    grid: dict[str, Any] = {}
    styles = config.chosen_styles()
    click.secho(
        f"== {config.devices} devices over {len(styles)} styles ({', '.join(styles)}); each owns "
        f"{config.samples} images in its style with its own tint, jitter and pattern geometry, "
        f"and trains {config.steps} steps (batch {config.batch_size}, lr {config.lr:g}) per "
        f"round, for {config.rounds} rounds, in every method",
        bold=True,
    )
    with device_pool(config.workers) as pool:
        for method, title in DEMO_METHODS.items():
            where = "no server" if method == "local" else "a fresh stack (Valkey, S3, SQLite)"
            click.secho(f"== {title}, on {where}", bold=True)
            run_config = replace(config, method=method)  # type: ignore[arg-type]
            while_up = None
            if method == "exact":

                def while_up(info: StackInfo, report: SimReport, report_dir: Path = output) -> None:
                    grid.update(_grid(info, report, report_dir))
                    if after is not None:
                        after(info, report)

            reports[title] = run_on_fresh_stack(
                run_config, folder / method, after=while_up, pool=pool
            )
    exact = reports[DEMO_METHODS["exact"]]
    click.secho("== Clusters found vs true styles", bold=True)
    click.echo(cluster_table(exact))
    click.secho("== Per round, the devices' own generations", bold=True)
    table = comparison_table(reports)
    click.echo(table)
    headline = {
        title: {
            "rounds_to_target": report.rounds_to(TARGET),
            "final_style_accuracy": report.rounds[-1].style_accuracy,
            "final_heldout_loss": report.rounds[-1].heldout_loss,
        }
        for title, report in reports.items()
    }
    click.secho(f"== Rounds to {TARGET:.0%} style accuracy, and the last round", bold=True)
    for title, row in headline.items():
        reached = row["rounds_to_target"]
        click.echo(
            f"   {title:<22} {'not reached' if reached is None else f'round {reached}':<12} "
            f"style accuracy {row['final_style_accuracy']:.2f}, "
            f"held-out loss {row['final_heldout_loss']:.4f}"
        )
    if grid.get("hybrid"):
        h = grid["hybrid"]
        a, b = h["styles"]
        click.echo(
            f"   hybrid {grid['hybrid_label']}: {h['carries_both']:.0%} of its images carry both "
            f"{a}'s and {b}'s attributes ({a} alone: {h['first_alone']:.0%}, "
            f"{b} alone: {h['second_alone']:.0%})"
        )
    plot_convergence(reports, output / "convergence.png", target=TARGET)
    seconds = time.perf_counter() - started
    result = {
        "config": {k: v for k, v in config.__dict__.items() if k != "method"},
        "methods": {title: report.to_dict() for title, report in reports.items()},
        "headline": headline,
        "grid": grid,
        "seconds": round(seconds, 1),
    }
    (output / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (output / "report.md").write_text(table + "\n")
    click.secho(f"== Done in {seconds:.0f}s; output in {output}", bold=True)
    click.echo("   convergence.png  held-out loss and style accuracy per round, every method")
    click.echo(f"   generations.png  rows: {', '.join(grid.get('labels', []))}")
    click.echo("   report.json, report.md")
    return result


def _grid(info: StackInfo, report: SimReport, output: Path) -> dict[str, Any]:
    """The cluster-aware run's published adapters drawn side by side, with a hybrid row."""
    from tessera.model.base import load_base_model
    from tessera.sim.report import generation_grid, published_adapters

    base = load_base_model()
    adapters = published_adapters(info.urls["aggregator"], info.operator_token, base)
    return generation_grid(base, adapters, report, output / "generations.png")


def write_docs(result: dict[str, Any], output: Path, docs: Path) -> None:
    """docs/federation.md and its convergence plot and generation grid, from a demo's output."""
    from tessera.demo_page import federation_page

    docs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(output / "convergence.png", docs / "federation_convergence.png")
    shutil.copyfile(output / "generations.png", docs / "federation_generations.png")
    page = federation_page(result, target=TARGET, command=f"tessera demo --docs {docs}")
    (docs / "federation.md").write_text(page)
    click.echo(f"   {docs / 'federation.md'} and its two images written")


def console_demo_settings(data_dir: Path) -> Settings:
    """The console demo's stack: embedded servers on free ports, plaintext prompts allowed
    (the console's Generate and Gallery send fixed or typed prompts for the server to encode)."""
    from tessera.sim.stack import demo_settings

    return demo_settings(data_dir, allow_plaintext_prompts=True)


def run_console_demo(data_dir: str, config: SimConfig = DEMO_CONFIG) -> StackInfo:
    """The demo's cluster-aware federation on a stack left running in the background, so that
    the operator console shows it; `stop_console_demo` stops it."""
    from tessera.sim.run import device_pool, simulate
    from tessera.stack import start_detached

    folder = Path(data_dir).resolve()
    stop_console_demo(data_dir)
    shutil.rmtree(folder, ignore_errors=True)
    settings = console_demo_settings(folder)
    # The supervisor reads its settings from the environment: these, and no other TESSERA_*.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    click.secho(f"== A stack on embedded servers in {folder}", bold=True)
    info = start_detached(settings, env={**env, **settings.as_env()})
    try:
        run_config = replace(config, method="exact")
        click.secho(
            f"== The demo's federation ({config.devices} devices), cluster-aware", bold=True
        )
        with device_pool(config.workers) as pool:
            simulate(
                run_config,
                aggregator_url=info.urls["aggregator"],
                clustering_url=info.urls["clustering"],
                operator_token=info.operator_token,
                work_dir=folder / "devices",
                log=click.echo,
                pool=pool,
                keep_devices=True,  # the console's map and overview show enabled devices
            )
    except BaseException:
        stop_console_demo(data_dir)
        raise
    return info


def stop_console_demo(data_dir: str) -> bool:
    """Stop the console demo's stack in `data_dir`; False if none was running."""
    from tessera.devstack import embedded_settings
    from tessera.stack import stop_detached

    return stop_detached(embedded_settings(Path(data_dir).resolve()))
