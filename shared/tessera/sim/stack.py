"""A throwaway stack for one simulation: embedded servers on free ports, started and stopped.

The demo, `tessera simulate` and the results runner all go through `run_on_fresh_stack`, so every
method of a comparison starts from an empty federation with the same settings.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tessera import procs
from tessera.config import LogFormat, Settings
from tessera.devstack import embedded_settings
from tessera.sim.run import (
    Buffering,
    SimConfig,
    SimReport,
    Stragglers,
    simulate,
    simulate_local,
)

if TYPE_CHECKING:
    from tessera.stack import StackInfo


def demo_settings(data_dir: Path, **values: Any) -> Settings:
    """Settings for a throwaway stack on free ports and embedded servers only."""
    ports = procs.free_ports(3)
    return embedded_settings(
        data_dir,
        **values,
        aggregator_url=f"http://127.0.0.1:{ports[0]}",
        clustering_url=f"http://127.0.0.1:{ports[1]}",
        inference_url=f"http://127.0.0.1:{ports[2]}",
        log_format=LogFormat.TEXT,
    )


def run_on_fresh_stack(
    config: SimConfig,
    data_dir: Path,
    *,
    log: Callable[[str], None] = click.echo,
    after: Callable[[StackInfo, SimReport], None] | None = None,
    pool: Executor | None = None,
    round_options: Mapping[str, Any] | None = None,
    stragglers: Stragglers | None = None,
    buffering: Buffering | None = None,
) -> SimReport:
    """Start a stack on embedded servers in `data_dir`, simulate, call `after(info, report)`
    while the stack still runs, stop it. The local method needs no stack: its devices train
    alone in `data_dir` (and `after` is not called). Device rounds run in `pool` when given;
    `round_options` are added to every round opened, `stragglers` slow some devices down and
    `buffering` runs one buffered round instead of sync rounds (see `simulate`)."""
    from tessera.stack import Stack

    shutil.rmtree(data_dir, ignore_errors=True)
    if config.method == "local":
        return simulate_local(config, work_dir=data_dir / "devices", log=log, pool=pool)
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
            pool=pool,
            round_options=round_options,
            stragglers=stragglers,
            buffering=buffering,
        )
        if after is not None:
            after(info, report)
        return report
    finally:
        stack.stop()
