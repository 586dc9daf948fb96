"""Load: many simulated devices at once against a stack, on the embedded backends and on
PostgreSQL and Redis.

    python bench/load.py --out docs
    python bench/load.py --out docs --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres

Starts the stack as `tessera up` does (two aggregator processes on its port, the clustering
and inference services, the workers; SQLite, Valkey and SeaweedFS embedded), opens a global
exact round of rank 4, and runs `--devices` simulated devices at once over async HTTP
(`tessera.sim.load`, no training): each enrols, sends its task vectors and one rank-4 update,
retrying 429 and 503 after their Retry-After as the SDK does. Then it closes the round, waits
for the worker to publish, and checks that every accepted update was counted and used.

With `--postgres ADMIN_URL`, the same runs again on a scratch PostgreSQL database created next
to ADMIN_URL's (dropped after) and a Valkey server of its own on a spare port, passed to the
stack by URL as an external Redis. Writes docs/bench_load.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from benchlib import machine, write_report
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tessera.config import Settings
from tessera.devstack import EmbeddedValkey
from tessera.federation import update_key, update_prefix
from tessera.lora import adapter_to_bytes, random_adapter
from tessera.model.encoder import task_encoder_info
from tessera.model.facts import load_facts, resolve_targets
from tessera.sim.load import STEPS, DevicePayloads, LoadReport, run_devices
from tessera.sim.stack import demo_settings
from tessera.stack import Stack
from tessera.storage import ObjectStore

RANK = 4
REPLICAS = 2
PUBLISH_TIMEOUT_S = 1800.0


def payloads(settings: Settings, count: int = 8) -> DevicePayloads:
    """Task vectors of the federation's encoder and `count` distinct rank-4 updates."""
    facts = load_facts(settings.base_model)
    spec = facts.lora_spec(resolve_targets(settings.lora_targets, settings.base_model))
    encoder = task_encoder_info(settings.task_encoder)
    updates = [
        adapter_to_bytes(random_adapter(spec, rank=RANK, alpha=float(RANK), seed=seed))
        for seed in range(count)
    ]
    return DevicePayloads(encoder_id=encoder.encoder_id, width=encoder.width, updates=updates)


def stored_updates(
    settings: Settings, backends: dict[str, str], round_id: int, accepted: dict[int, str]
) -> dict[str, int]:
    """The round's update objects in the store against the accepted updates: how many there
    are, how many no accepted update names (orphans), and how many accepted ones are missing."""
    store = ObjectStore.from_settings(
        settings.model_copy(update={"s3_endpoint": backends["TESSERA_S3_ENDPOINT"]})
    )
    keys = set(store.list_keys(update_prefix(round_id)))
    expected = {update_key(round_id, client, sha256) for client, sha256 in accepted.items()}
    return {"stored": len(keys), "orphans": len(keys - expected), "missing": len(expected - keys)}


def published(url: str, token: str, round_id: int) -> dict[str, Any]:
    """Close the round, then wait for it to be published; the round as the API shows it."""
    headers = {"Authorization": f"Bearer {token}"}
    closed = httpx.post(f"{url}/v1/rounds/{round_id}/close", headers=headers, timeout=120)
    closed.raise_for_status()
    deadline = time.monotonic() + PUBLISH_TIMEOUT_S
    while time.monotonic() < deadline:
        round_ = httpx.get(f"{url}/v1/rounds/{round_id}", headers=headers, timeout=60).json()
        if round_["state"] in ("published", "failed", "cancelled"):
            return dict(round_)
        time.sleep(2)
    raise TimeoutError(f"round {round_id} not published within {PUBLISH_TIMEOUT_S:.0f} s")


def run_one(settings: Settings, devices: int) -> dict[str, Any]:
    """One load run on a fresh stack; its figures and the aggregation check."""
    stack = Stack(settings)
    try:
        info = stack.start()
        url, token = info.urls["aggregator"], info.operator_token
        opened = httpx.post(
            f"{url}/v1/rounds",
            json={"method": "exact", "scope": "global", "rank": RANK, "min_updates": 100_000},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        opened.raise_for_status()
        round_id = opened.json()["id"]
        report: LoadReport = asyncio.run(
            run_devices(
                url=url,
                operator_token=token,
                round_id=round_id,
                payloads=payloads(settings),
                devices=devices,
                name_prefix="load",
            )
        )
        load_average = list(os.getloadavg())
        objects = stored_updates(settings, info.backends, round_id, report.accepted)
        ready = httpx.get(f"{url}/readyz", timeout=30).status_code
        started = time.perf_counter()
        round_ = published(url, token, round_id)
        aggregated_s = time.perf_counter() - started
    finally:
        stack.stop()
    clusters = (round_.get("report") or {}).get("clusters", [])
    used = sum(cluster.get("used", 0) for cluster in clusters)
    return {
        **report.summary(),
        "load_average": load_average,
        "readyz_after": ready,
        "objects": objects,
        "round": {
            "state": round_["state"],
            "updates": round_["updates"],
            "used": used,
            "excluded": len(round_.get("excluded") or []),
            "aggregated_s": aggregated_s,
        },
        "every_accepted_update_used": round_["state"] == "published"
        and round_["updates"] == used == report.finished,
    }


@contextlib.contextmanager
def scratch_postgres(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database next to `admin_url`'s, dropped afterwards."""
    name = f"tessera_load_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def own_valkey(folder: Path) -> Iterator[str]:
    """A Valkey server of this run's own, on a spare port: an external Redis to the stack."""
    server = EmbeddedValkey(folder, persistent=False)
    try:
        yield server.start()
    finally:
        server.stop()


def stack_settings(folder: Path, **backends: str) -> Settings:
    """A throwaway stack's settings (free ports, embedded servers but for `backends`)."""
    return demo_settings(folder, aggregator_replicas=REPLICAS).model_copy(update=backends)


def _count(statuses: dict[str, int], code: int) -> int:
    """Answers with `code`, every step together (keys are "step code")."""
    return sum(n for key, n in statuses.items() if key.endswith(f" {code}"))


def _orphans(run: dict[str, Any]) -> str:
    objects = run.get("objects")
    if objects is None:
        return "not counted"
    return f"{objects['orphans']} ({objects['stored']} stored, {objects['missing']} missing)"


def _no_answer(run: dict[str, Any]) -> str:
    """Requests that got no answer (then retried), by error type."""
    kinds: dict[str, int] = {}
    for key, n in run.get("transport_errors", {}).items():
        kind = key.split(" ", 1)[1]
        kinds[kind] = kinds.get(kind, 0) + n
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "0"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Load: devices at once against one stack",
        "",
        f"{report['devices']} simulated devices at once (async HTTP, no training), each: enrol, "
        f"send task vectors, upload one rank-{RANK} update into one global round; "
        f"{REPLICAS} aggregator processes; 429/503 retried after their Retry-After "
        "(`tessera.sim.load`, `python bench/load.py`). A step's rate is its successes over the "
        "time from the run's start to its last success; latencies are a device's time to "
        "success, retries included (the wait for a turn, each 503's Retry-After).",
        "",
        "| backends | finished | wall s | enrol/s | vectors/s | uploads/s | enrol p50/p95/p99 ms "
        "| vectors p50/p95/p99 ms | upload p50/p95/p99 ms | 503 retried | 429 retried "
        "| no answer, retried | errors | 500s | orphan objects | used in aggregate | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in report["runs"].items():
        steps = run["steps"]

        def pct(step: str, steps: dict[str, Any] = steps) -> str:
            return " / ".join(f"{steps[step][f'p{q}_s'] * 1e3:,.0f}" for q in (50, 95, 99))

        statuses = run["statuses"]
        lines.append(
            f"| {name} | {run['finished']}/{run['devices']} | {run['wall_s']:.1f} "
            + " ".join(f"| {steps[s]['per_s']:.1f}" for s in STEPS)
            + " "
            + " ".join(f"| {pct(s)}" for s in STEPS)
            + f" | {_count(statuses, 503)} | {_count(statuses, 429)} "
            f"| {_no_answer(run)} "
            f"| {sum(run['failures'].values())} | {_count(statuses, 500)} "
            f"| {_orphans(run)} "
            f"| {run['round']['used']} of {run['finished']} "
            f"({'all' if run['every_accepted_update_used'] else 'NOT all'}; "
            f"published {run['round']['aggregated_s']:.0f} s after the close) "
            f"| {', '.join(f'{x:.1f}' for x in run['load_average'])} |"
        )
    lines += [
        "",
        "'used in aggregate': updates the worker aggregated (the round's report) against uploads "
        "the server accepted (201); the round's `updates` count agrees with both. "
        "'orphan objects': the round's update objects in the store that no accepted update "
        "names, counted before the close (with the objects stored, and accepted updates whose "
        "object is missing). 'no answer': requests whose connection failed before a response "
        "(reset, timeout), retried like a 503. 'errors': operations that still failed after "
        "every retry. Load average: at the end of the devices' run, on a machine shared with "
        "other work.",
        "",
        "Default settings: each aggregator process works on `TESSERA_MAX_REQUESTS_IN_FLIGHT` = 16 "
        "requests at once, the rest wait up to `TESSERA_REQUEST_QUEUE_S` = 10 s, then 503 with "
        "Retry-After 2. The second run uses a scratch PostgreSQL database (dropped after) and a "
        "Valkey server of its own passed by URL as an external Redis; the object store stays "
        "the embedded SeaweedFS. Run: `python bench/load.py --out docs --postgres "
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres`.",
        "",
        f"Machine: {report['machine']}.",
        "",
        "![latency percentiles per step](bench_load.png)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = report["runs"]
    figure, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for axis, (name, run) in zip(axes[0], runs.items(), strict=True):
        for offset, q in enumerate((50, 95, 99)):
            values = [run["steps"][s][f"p{q}_s"] for s in STEPS]
            axis.bar([i + offset * 0.27 for i in range(len(STEPS))], values, 0.27, label=f"p{q}")
        axis.set_xticks([i + 0.27 for i in range(len(STEPS))], STEPS)
        axis.set_ylabel("seconds to success (retries included)")
        axis.set_title(f"{name}\n{run['finished']} devices in {run['wall_s']:.0f} s", fontsize=9)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--postgres", default=None, help="admin URL of a PostgreSQL server for the second run"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the table and plot from the JSON"
    )
    args = parser.parse_args()
    path = args.out / "bench_load.json"
    if args.report_only:
        report = json.loads(path.read_text())
    else:
        runs = {}
        with tempfile.TemporaryDirectory(prefix="tessera-load-") as folder:
            root = Path(folder)
            runs["embedded (SQLite, Valkey, SeaweedFS)"] = run_one(
                stack_settings(root / "embedded"), args.devices
            )
            if args.postgres:
                with (
                    scratch_postgres(args.postgres) as database,
                    own_valkey(root / "valkey") as redis,
                ):
                    external = stack_settings(
                        root / "external", database_url=database, redis_url=redis
                    )
                    runs["PostgreSQL + Redis (SeaweedFS)"] = run_one(external, args.devices)
        report = {"devices": args.devices, "runs": runs, "machine": machine(1)}
    write_report(report, args.out, "bench_load", markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
