"""The `tessera` command: run the stack, migrate the database, manage clients, rounds,
re-clusterings and adapters, run the demo."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import click
import httpx

from tessera import db, stack
from tessera.config import get_settings
from tessera.lora import (
    LoraFileError,
    LoraSpec,
    adapter_from_bytes,
    adapter_to_bytes,
    read_header,
)
from tessera.lora.files import FILE_FORMAT
from tessera.lora.interop import EXPORT_FORMATS, ExportFormat, export_adapter, import_adapter
from tessera.model.cli import model_group
from tessera.models import Role
from tessera.sdk.cli import device_group
from tessera.sim.cli import simulate_cmd


@click.group()
def main() -> None:
    """Tessera: federated, personalised fine-tuning of diffusion models at the edge."""


@main.command()
@click.option("--detach", is_flag=True, help="Run in the background; stop with `tessera down`.")
def up(detach: bool) -> None:
    """Start the backends (embedded where no URL is set), migrations, services and a worker."""
    settings = get_settings()
    if detach:
        _print_info(stack.start_detached(settings))
        return
    stack.run_foreground(settings, on_ready=_print_ready_and_wait)


def _print_ready_and_wait(info: stack.StackInfo) -> None:
    _print_info(info)
    click.echo("Press Ctrl-C to stop.")


def _print_info(info: stack.StackInfo) -> None:
    click.echo("Tessera is up:")
    for name, url in info.urls.items():
        click.echo(f"  {name:<11} {url}   (docs: {url}/docs)")
    click.echo(
        f"  {'console':<11} {stack.console_url(info.urls)}   (sign in with the operator token)"
    )
    for name, url in info.metrics.items():
        click.echo(f"  {name + ' metrics':<26} {url}")
    for name, url in info.backends.items():
        click.echo(f"  {name:<26} {url}")
    click.echo(f"  operator token  {info.operator_token}")
    click.echo(f"  logs            {info.log_dir}")


@main.command()
def down() -> None:
    """Stop a stack started with `tessera up --detach`."""
    if stack.stop_detached(get_settings()):
        click.echo("Tessera stopped.")
    else:
        click.echo("No running stack found.")


@main.command()
def status() -> None:
    """Show each service's readiness."""
    settings = get_settings()
    info = stack.read_state(settings)
    urls = info.urls if info is not None else stack.service_urls(settings)
    failed = False
    for name, url in urls.items():
        line, ready = _readiness_line(name, url)
        failed |= not ready
        click.echo(line)
    sys.exit(1 if failed else 0)


def _readiness_line(name: str, url: str) -> tuple[str, bool]:
    try:
        response = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError as error:
        return f"{name:<11} {url:<28} down ({type(error).__name__})", False
    checks = response.json().get("checks", {})
    summary = ", ".join(f"{k}={v}" for k, v in checks.items())
    state = "ready" if response.status_code == 200 else "UNREADY"
    return f"{name:<11} {url:<28} {state}  {summary}", response.status_code == 200


@main.group(name="db")
def db_group() -> None:
    """Database migrations."""


@db_group.command(name="upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Migrate the configured database up to REVISION (default: head)."""
    db.upgrade(get_settings().resolved_database_url, revision)


@db_group.command(name="downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Migrate the configured database down to REVISION ("base" drops everything)."""
    db.downgrade(get_settings().resolved_database_url, revision)


@main.group()
def client() -> None:
    """Enrol and manage clients through the aggregator (needs the operator token)."""


def _operator_client(base_url: str | None = None) -> httpx.Client:
    settings = get_settings()
    info = stack.read_state(settings)
    base = base_url or (info.urls["aggregator"] if info else settings.aggregator_url)
    token = info.operator_token if info else settings.operator_token.get_secret_value()
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _echo_response(response: httpx.Response) -> None:
    if response.is_error:
        raise click.ClickException(f"{response.status_code}: {response.text}")
    click.echo(json.dumps(response.json(), indent=2))


@client.command(name="enrol")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    default=Role.DEVICE.value,
    show_default=True,
)
def client_enrol(name: str, role: str) -> None:
    """Enrol NAME and print its token (shown once)."""
    with _operator_client() as http:
        _echo_response(http.post("/v1/clients", json={"name": name, "role": role}))


@client.command(name="list")
def client_list() -> None:
    """List enrolled clients."""
    with _operator_client() as http:
        _echo_response(http.get("/v1/clients"))


@client.command(name="disable")
@click.argument("client_id", type=int)
def client_disable(client_id: int) -> None:
    """Disable a client: its token stops working."""
    with _operator_client() as http:
        _echo_response(http.patch(f"/v1/clients/{client_id}", json={"disabled": True}))


@client.command(name="remove")
@click.argument("client_id", type=click.IntRange(1, 2**31 - 1))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def client_remove(client_id: int, yes: bool) -> None:
    """Remove a client with its task vectors, updates, assignments, adapters and jobs."""
    if not yes:
        click.confirm(f"Remove client {client_id} and everything it uploaded?", abort=True)
    with _operator_client() as http:
        _echo_response(http.delete(f"/v1/clients/{client_id}"))


@client.command(name="rotate")
@click.argument("client_id", type=int)
def client_rotate(client_id: int) -> None:
    """Give a client a new token (printed once); the old one stops working."""
    with _operator_client() as http:
        _echo_response(http.post(f"/v1/clients/{client_id}/token"))


@main.group(name="round")
def round_group() -> None:
    """Open and inspect federated rounds through the aggregator (needs the operator token)."""


@round_group.command(name="open")
@click.option("--method", type=click.Choice(["exact", "fedavg", "secure"]), default=None)
@click.option("--scope", type=click.Choice(["cluster", "global"]), default=None)
@click.option("--rank", type=int, default=None)
@click.option(
    "--power-passes",
    type=int,
    default=None,
    help="Exact beyond summed rank 256: the sketch's power passes (0-8, default 1).",
)
@click.option("--min-updates", type=int, default=None)
@click.option("--min-updates-per-cluster", type=int, default=None)
@click.option("--deadline-s", type=float, default=None)
@click.option("--lam", type=float, default=None, help="Share of the neighbours (0: off).")
@click.option("--temperature", type=float, default=None)
@click.option(
    "--weighting",
    type=click.Choice(["samples", "equal"]),
    default=None,
    help="Update weights: sample counts capped at --max-weight-ratio medians, or equal.",
)
@click.option("--max-weight-ratio", type=float, default=None)
@click.option(
    "--clip",
    type=click.Choice(["adaptive", "fixed"]),
    default=None,
    help="Norm bound per update: --clip-multiplier medians of the cluster, or --clip-norm.",
)
@click.option("--clip-multiplier", type=float, default=None)
@click.option("--clip-norm", type=float, default=None)
@click.option(
    "--robust",
    type=click.Choice(["none", "norm", "trimmed", "krum"]),
    default=None,
    help="Robust selection per cluster: drop the norms over --robust-norm-ratio medians, drop "
    "the --robust-trim share farthest from the median, or keep n - --robust-f by Multi-Krum.",
)
@click.option("--robust-norm-ratio", type=float, default=None)
@click.option("--robust-trim", type=float, default=None)
@click.option("--robust-f", type=int, default=None)
@click.option(
    "--noise-multiplier",
    type=float,
    default=None,
    help="Differential privacy: Gaussian noise of std this times --clip-norm on each cluster's "
    "sum (needs --clip fixed, --weighting equal); `round show` then gives each device's epsilon.",
)
@click.option(
    "--secure-threshold", type=int, default=None, help="Secure mode: devices needed per phase."
)
@click.option(
    "--secure-phase-s", type=float, default=None, help="Secure mode: seconds each phase waits."
)
def round_open(**options: object) -> None:
    """Open the next round; options left out take the server's defaults."""
    secure = {
        "threshold": options.pop("secure_threshold"),
        "phase_s": options.pop("secure_phase_s"),
    }
    config: dict[str, object] = {
        name: value for name, value in options.items() if value is not None
    }
    if any(value is not None for value in secure.values()):
        config["secure"] = {name: value for name, value in secure.items() if value is not None}
    with _operator_client() as http:
        _echo_response(http.post("/v1/rounds", json=config))


@round_group.command(name="list")
@click.option("--limit", type=int, default=20, show_default=True)
def round_list(limit: int) -> None:
    """List rounds, newest first."""
    with _operator_client() as http:
        _echo_response(http.get("/v1/rounds", params={"limit": limit}))


@round_group.command(name="show")
@click.argument("round_id", type=int)
def round_show(round_id: int) -> None:
    """Show a round: progress, published versions, excluded updates and why, its report and,
    for a private round, each device's epsilon after it."""
    with _operator_client() as http:
        _echo_response(http.get(f"/v1/rounds/{round_id}"))


@round_group.command(name="exclude")
@click.argument("round_id", type=click.IntRange(1, 2**31 - 1))
@click.argument("client_id", type=click.IntRange(1, 2**31 - 1))
@click.option("--reason", required=True, help="Shown on the round beside the exclusion.")
def round_exclude(round_id: int, client_id: int, reason: str) -> None:
    """Exclude CLIENT_ID's update from collecting round ROUND_ID; it cannot replace it."""
    with _operator_client() as http:
        _echo_response(
            http.post(
                f"/v1/rounds/{round_id}/exclusions",
                json={"client_id": client_id, "reason": reason},
            )
        )


@round_group.command(name="retry")
@click.argument("round_id", type=click.IntRange(1, 2**31 - 1))
def round_retry(round_id: int) -> None:
    """Aggregate an aggregating or failed round again, now."""
    with _operator_client() as http:
        _echo_response(http.post(f"/v1/rounds/{round_id}/retry"))


@round_group.command(name="fail")
@click.argument("round_id", type=click.IntRange(1, 2**31 - 1))
def round_fail(round_id: int) -> None:
    """Fail an aggregating round: nothing it would publish is announced."""
    with _operator_client() as http:
        _echo_response(http.post(f"/v1/rounds/{round_id}/fail"))


@main.group(name="cluster")
def cluster_group() -> None:
    """Re-cluster devices through the clustering service (needs the operator token)."""


def _clustering_client() -> httpx.Client:
    settings = get_settings()
    info = stack.read_state(settings)
    return _operator_client(info.urls["clustering"] if info else settings.clustering_url)


def _echo_job(job: dict[str, Any]) -> None:
    reason = f": {job['error']}" if job.get("error") else ""
    made = f" (version {job['clustering_version']})" if job.get("clustering_version") else ""
    click.echo(f"job {job['id']} {job['state']}{made}{reason}", err=True)


def _follow(http: httpx.Client, job_id: int, timeout_s: float) -> None:
    from tessera.sdk.operator import ClusteringJobError, follow_job

    try:
        job = follow_job(http, job_id, timeout_s=timeout_s, on_change=_echo_job)
    except ClusteringJobError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(job, indent=2))
    if job["state"] == "failed":
        raise click.ClickException(f"re-clustering job {job_id} failed: {job['error']}")


@cluster_group.command(name="run")
@click.option("--method", type=click.Choice(["kmeans", "agglomerative", "hdbscan"]), default=None)
@click.option("--k", type=click.IntRange(1, 64), default=None, help="Default: by silhouette.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None)
@click.option("--min-cluster-size", type=click.IntRange(2, 1000), default=None)
@click.option("--distance-threshold", type=float, default=None)
@click.option("--follow", is_flag=True, help="Wait for the job, printing each state it takes.")
@click.option("--timeout-s", type=float, default=3600, show_default=True, help="With --follow.")
def cluster_run(follow: bool, timeout_s: float, **options: object) -> None:
    """Queue a re-clustering of every enabled device; print the job (and follow it)."""
    body = {name: value for name, value in options.items() if value is not None}
    with _clustering_client() as http:
        response = http.post("/v1/clusterings", json=body)
        if not follow:
            _echo_response(response)
            return
        if response.is_error:
            raise click.ClickException(f"{response.status_code}: {response.text}")
        _echo_job(response.json())
        _follow(http, response.json()["id"], timeout_s)


@cluster_group.command(name="job")
@click.argument("job_id", type=click.IntRange(1, 2**31 - 1))
@click.option("--follow", is_flag=True, help="Wait until it has succeeded or failed.")
@click.option("--timeout-s", type=float, default=3600, show_default=True, help="With --follow.")
def cluster_job(job_id: int, follow: bool, timeout_s: float) -> None:
    """Show a re-clustering job: its state, the version it made, or why it failed."""
    with _clustering_client() as http:
        if follow:
            _follow(http, job_id, timeout_s)
        else:
            _echo_response(http.get(f"/v1/clustering-jobs/{job_id}"))


@cluster_group.command(name="jobs")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
def cluster_jobs(limit: int) -> None:
    """The newest re-clustering jobs, newest first."""
    with _clustering_client() as http:
        _echo_response(http.get("/v1/clustering-jobs", params={"limit": limit}))


@main.group()
def adapter() -> None:
    """Convert adapters to and from diffusers' and kohya's LoRA files."""


@adapter.command(name="export")
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16")
@click.option("--aggregator-url", default=None, help="Where to fetch a version id from.")
def adapter_export(
    source: str, fmt: ExportFormat, out: Path, dtype: str, aggregator_url: str | None
) -> None:
    """Write SOURCE (a Tessera adapter file, or an adapter version id) as a diffusers/kohya file."""
    if Path(source).is_file():
        data = Path(source).read_bytes()
    elif source.isdigit():
        with _operator_client(aggregator_url) as http:
            data = _download_version(http, int(source))
    else:
        raise click.BadParameter(
            f"{source!r} is neither a file nor a version id", param_hint="SOURCE"
        )
    try:
        if read_header(data)[1].get("format") != FILE_FORMAT:
            raise LoraFileError(f"not a Tessera adapter file ({FILE_FORMAT}); import it first")
        exported = export_adapter(adapter_from_bytes(data), fmt, dtype=dtype)
    except LoraFileError as error:
        raise click.ClickException(f"{source}: {error}") from None
    out.write_bytes(exported)
    click.echo(f"wrote {out} ({fmt}, {len(exported)} bytes)")


def _download_version(http: httpx.Client, version_id: int) -> bytes:
    """An adapter version's file through its presigned URL, its sha256 checked."""
    try:
        response = http.get(f"/v1/adapter-versions/{version_id}")
        if response.is_error:
            raise click.ClickException(f"{response.status_code}: {response.text}")
        info = response.json()
        data = httpx.get(info["download_url"], timeout=60).raise_for_status().content
    except httpx.HTTPError as error:
        raise click.ClickException(f"adapter version {version_id}: {error}") from None
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise click.ClickException(
            f"adapter version {version_id}: download failed its sha256 check"
        )
    return data


@adapter.command(name="import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--model",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Base model folder (default: TESSERA_BASE_MODEL).",
)
@click.option(
    "--skip-text-encoder", is_flag=True, help="Drop text-encoder keys instead of refusing."
)
def adapter_import(source: Path, out: Path, model: Path | None, skip_text_encoder: bool) -> None:
    """Convert a diffusers or kohya LoRA file into a Tessera adapter for the base model."""
    try:
        spec = _base_lora_spec(model)
    except ValueError as error:  # ModelFolderError too: no model, or an unreadable one
        raise click.ClickException(f"base model: {error}") from None
    try:
        imported = import_adapter(source.read_bytes(), spec, skip_text_encoder=skip_text_encoder)
    except LoraFileError as error:
        raise click.ClickException(f"{source}: {error}") from None
    result = imported.adapter
    out.write_bytes(adapter_to_bytes(result))
    click.echo(
        f"wrote {out}: {imported.layout} file, {len(result.modules) - len(imported.filled)} "
        f"modules adapted, {len(imported.filled)} zero-filled, {len(imported.skipped)} "
        f"text-encoder keys dropped; rank {result.rank}, alpha {result.alpha:g}"
    )


def _base_lora_spec(folder: Path | None) -> LoraSpec:
    """The spec uploads are validated with: `folder`'s facts under TESSERA_LORA_TARGETS."""
    from tessera.model.facts import load_facts, resolve_targets

    settings = get_settings()
    model = folder or settings.base_model
    return load_facts(model).lora_spec(resolve_targets(settings.lora_targets, model))


@main.command()
@click.option("--data-dir", default=".tessera-demo", show_default=True, help="Scratch folder.")
@click.option(
    "--docs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write federation.md and its two images here (the committed docs/ page).",
)
def demo(data_dir: str, docs: Path | None) -> None:
    """Run the whole system on embedded defaults, show it working, and stop it."""
    from tessera.demo import run_demo, write_docs

    result = run_demo(data_dir)
    if docs is not None:
        write_docs(result, Path(data_dir) / "output", docs)


@main.command(name="console-demo")
@click.option(
    "--data-dir", default=".tessera-console-demo", show_default=True, help="The stack's folder."
)
@click.option("--stop", is_flag=True, help="Stop the console demo's stack instead.")
def console_demo(data_dir: str, stop: bool) -> None:
    """Simulate the demo's federation on a stack left running; print the console's URL."""
    from tessera.demo import run_console_demo, stop_console_demo

    if stop:
        click.echo("Console demo stopped." if stop_console_demo(data_dir) else "No stack running.")
        return
    info = run_console_demo(data_dir)
    click.secho("== The stack keeps running with the demo's federation in it", bold=True)
    _print_info(info)
    click.secho(
        f"Open the console: {stack.console_url(info.urls)} and sign in with the operator token "
        f"above. Stop the stack with `tessera console-demo --stop --data-dir {data_dir}`.",
        bold=True,
    )


main.add_command(device_group)
main.add_command(model_group)
main.add_command(simulate_cmd)

if __name__ == "__main__":
    main()
