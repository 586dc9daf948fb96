"""`make demo`: the whole system on embedded defaults, shown working, then stopped."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click
import httpx

from tessera import procs
from tessera.config import LogFormat, Settings
from tessera.stack import Stack


def demo_settings(data_dir: Path) -> Settings:
    """Settings for a throwaway stack on free ports, so the demo never clashes with `tessera up`."""
    ports = procs.free_ports(3)
    return Settings(
        data_dir=data_dir,
        aggregator_url=f"http://127.0.0.1:{ports[0]}",
        clustering_url=f"http://127.0.0.1:{ports[1]}",
        inference_url=f"http://127.0.0.1:{ports[2]}",
        log_format=LogFormat.TEXT,
    )


def run_demo(data_dir: str) -> None:
    folder = Path(data_dir).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    settings = demo_settings(folder)
    click.secho("== Starting Tessera on embedded servers (Valkey, SeaweedFS, SQLite)", bold=True)
    started = time.perf_counter()
    stack = Stack(settings)
    try:
        info = stack.start()
        click.echo(f"   up in {time.perf_counter() - started:.1f}s; logs in {info.log_dir}")
        for name, url in info.backends.items():
            click.echo(f"   {name:<22} {url}")
        operator = {"Authorization": f"Bearer {info.operator_token}"}
        with httpx.Client(base_url=settings.aggregator_url, timeout=30) as http:
            click.secho("== Enrolling a device (operator token)", bold=True)
            enrolled = http.post(
                "/v1/clients", json={"name": "demo-device-1", "role": "device"}, headers=operator
            )
            enrolled.raise_for_status()
            device = enrolled.json()
            click.echo(
                f"   device id={device['id']} name={device['name']} token={device['token'][:10]}…"
            )
            me = http.get("/v1/clients/me", headers={"Authorization": f"Bearer {device['token']}"})
            me.raise_for_status()
            click.echo(
                f"   the device's token authenticates as: {me.json()['name']} ({me.json()['role']})"
            )
            refused = http.post(
                "/v1/clients",
                json={"name": "x"},
                headers={"Authorization": f"Bearer {device['token']}"},
            )
            detail = refused.json()["detail"]
            click.echo(f"   the device may not enrol others: {refused.status_code} {detail}")
        click.secho("== Readiness of every service", bold=True)
        for name, url in info.urls.items():
            ready = httpx.get(f"{url}/readyz", timeout=10)
            checks = ", ".join(f"{k}={v}" for k, v in ready.json()["checks"].items())
            click.echo(f"   {name:<11} {ready.status_code} {ready.json()['status']:<8} {checks}")
            if ready.status_code != 200:
                raise click.ClickException(f"{name} is not ready")
    finally:
        click.secho("== Stopping", bold=True)
        stack.stop()
    leftovers = [c.name for c in stack.children if c.process and c.process.poll() is None]
    click.echo("   every process stopped" if not leftovers else f"   STILL RUNNING: {leftovers}")
