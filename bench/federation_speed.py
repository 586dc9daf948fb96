"""Federation speed: aggregating N updates, and devices uploading them over HTTP.

    python bench/federation_speed.py --out docs

(a) *Aggregation* of N rank-8 updates of the tiny UNet (N = 4, 16, 64, 256) into one rank-8
    adapter: `aggregate_exact` (sum of the products B·A in float64, then a truncated SVD per
    module) and `aggregate_fedavg` (per-tensor mean, the generic-FL baseline), in memory; and
    the worker's own path for one cluster, `aggregate_plan`, which streams each update from
    the object store (embedded SeaweedFS), checks its sha256 and parses it, twice (bounding:
    a first pass measures each update's norm, the second clips it), before the maths.
(b) *Uploads*: devices PUT their update (rank 8 and rank 32, fp16 safetensors) to a running
    aggregator (uvicorn, SQLite, SeaweedFS, started as `tessera up` starts it) through the
    device SDK: one device at a time (latency), then 8 devices at once (throughput). Each
    upload is streamed, validated in full and stored with its sha256 before the 200.

Writes docs/bench_federation.md, .json and .png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    common_arguments,
    embedded_backends,
    machine,
    ms,
    per_call,
    summary,
    write_report,
)

from services.worker.aggregation import RoundPlan, UpdateRef, aggregate_plan
from tessera import procs
from tessera.devstack import embedded_settings
from tessera.federation import RoundConfig, update_key
from tessera.lora import LoraAdapter, adapter_to_bytes, random_adapter
from tessera.lora.aggregate import WeightedUpdate, aggregate_exact, aggregate_fedavg
from tessera.lora.bounds import ScaleRange
from tessera.lora.files import validate_adapter_bytes
from tessera.model.base import BaseModel, load_base_model
from tessera.stack import Stack
from tessera.storage import ObjectStore

UPDATE_COUNTS = (4, 16, 64, 256)
RANK = 8
UPLOAD_RANKS = (8, 32)
DEVICES = 8
SCALES = ScaleRange(1e-3, 16.0)  # the settings' defaults


def updates(base: BaseModel, count: int, rank: int = RANK) -> list[LoraAdapter]:
    return [random_adapter(base.lora_spec, rank, float(rank), seed=i) for i in range(count)]


def weighted(adapters: list[LoraAdapter]) -> list[WeightedUpdate]:
    return [WeightedUpdate(a, float(1 + i % 5)) for i, a in enumerate(adapters)]


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median and p95 of `repeats` calls after one warm-up call."""
    fn()
    return summary(per_call(lambda _: fn(), range(repeats)))


def bench_aggregation(
    base: BaseModel, store: ObjectStore, counts: list[int], repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        adapters = updates(base, count)
        refs = []
        for i, adapter in enumerate(adapters):
            data = adapter_to_bytes(adapter)
            stored = store.put_bytes(update_key(1, i, hashlib.sha256(data).hexdigest()), data)
            refs.append(UpdateRef(i, i, stored.key, stored.sha256, 1 + i % 5, None))
        plan = RoundPlan(
            round_id=1,
            config=RoundConfig(scope="global", method="exact", rank=RANK, lam=0.0),
            opened_at=datetime.now(UTC),
            clustering_id=None,
            groups={None: refs},
            centroids={},
        )
        row = {
            "updates": count,
            "exact": timed(lambda a=adapters: aggregate_exact(weighted(a), rank=RANK), repeats),
            "fedavg": timed(lambda a=adapters: aggregate_fedavg(weighted(a), rank=RANK), repeats),
            "streamed_exact": timed(
                lambda p=plan: aggregate_plan(p, store=store, scales=SCALES), repeats
            ),
        }
        outcome = aggregate_plan(plan, store=store, scales=SCALES)
        assert len(outcome.used) == count and not outcome.excluded
        rows.append(row)
        print(f"aggregation of {count}: {row}", flush=True)
    return rows


def bench_uploads(base: BaseModel, folder: Path, repeats: int) -> list[dict[str, Any]]:
    ports = procs.free_ports(3)
    settings = embedded_settings(
        folder,
        aggregator_url=f"http://127.0.0.1:{ports[0]}",
        clustering_url=f"http://127.0.0.1:{ports[1]}",
        inference_url=f"http://127.0.0.1:{ports[2]}",
    )
    stack = Stack(settings)
    rows = []
    try:
        info = stack.start()
        devices, round_id = enrol_and_open_round(info.urls["aggregator"], info.operator_token)
        for rank in UPLOAD_RANKS:
            adapter = random_adapter(base.lora_spec, rank, float(rank), seed=rank)
            row = {
                "rank": rank,
                "size_bytes": len(adapter_to_bytes(adapter)),
                "validate": timed(
                    lambda a=adapter: validate_adapter_bytes(adapter_to_bytes(a), base.lora_spec),
                    repeats,
                ),
                **measure_uploads(devices, round_id, adapter, uploads_each=repeats * 4),
            }
            row["concurrent"]["mb_per_s"] = (
                row["concurrent"]["uploads_per_s"] * row["size_bytes"] / 1e6
            )
            rows.append(row)
            print(f"uploads of rank {rank}: {row}", flush=True)
    finally:
        stack.stop()
    return rows


def measure_uploads(
    devices: list[Any], round_id: int, adapter: LoraAdapter, *, uploads_each: int
) -> dict[str, Any]:
    """One device uploading `uploads_each` times, then every device that many times at once."""

    def upload(device: Any) -> None:
        device.upload_update(round_id, adapter, num_samples=4)  # a re-upload replaces

    upload(devices[0])  # warm-up
    sequential = summary(per_call(lambda _: upload(devices[0]), range(uploads_each)))
    lock = threading.Lock()
    latencies: list[float] = []

    def device_loop(device: Any) -> None:
        samples = per_call(lambda _: upload(device), range(uploads_each))
        with lock:
            latencies.extend(samples)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(devices)) as pool:
        list(pool.map(device_loop, devices))
    elapsed = time.perf_counter() - start
    return {
        "sequential": sequential,
        "concurrent": {
            **summary(latencies),
            "devices": len(devices),
            "uploads_per_s": len(latencies) / elapsed,
        },
    }


def enrol_and_open_round(aggregator_url: str, operator_token: str) -> tuple[list[Any], int]:
    """DEVICES enrolled devices and a round that stays open (its quorum is never reached)."""
    import httpx

    from tessera.sdk.device import DeviceClient

    devices = [
        DeviceClient.enrol(
            aggregator_url=aggregator_url, operator_token=operator_token, name=f"bench-{i}"
        )
        for i in range(DEVICES)
    ]
    response = httpx.post(
        f"{aggregator_url}/v1/rounds",
        json={"scope": "global", "min_updates": 100_000},
        headers={"Authorization": f"Bearer {operator_token}"},
    )
    response.raise_for_status()
    return devices, int(response.json()["id"])


# -- reporting -----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Federation speed (`make bench`: bench/federation_speed.py)",
        "",
        f"Measured on this machine: {report['machine']}; torch {report['torch']}. Updates are "
        f"random rank-{RANK} adapters on all {report['target_layers']} attention projections "
        "of the tiny UNet.",
        "",
        "## (a) Aggregating N updates into one adapter",
        "",
        f"Milliseconds, median of {report['repeats']} runs after a warm-up. *Streamed* is the "
        "worker's path for one cluster (`aggregate_plan`, method exact): each update read from "
        "the embedded SeaweedFS, its sha256 checked, parsed, twice (a first pass measures its "
        "norm for the clip bound, the second clips it), then the maths.",
        "",
        "| updates | exact ms | per update | fedavg ms | per update | streamed exact ms "
        "| per update |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["aggregation"]:
        n = row["updates"]
        cells = [
            f"{ms(row[key]['median_s'])} | {ms(row[key]['median_s'] / n)}"
            for key in ("exact", "fedavg", "streamed_exact")
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## (b) Uploading an update over HTTP",
        "",
        "PUT `/v1/rounds/{id}/updates/{device}` through `DeviceClient.upload_update` to the "
        "aggregator under uvicorn (SQLite, SeaweedFS); every upload is validated in full and "
        "stored with its sha256 before the answer. Milliseconds per upload; *validate* is "
        "`validate_adapter_bytes` alone, for scale.",
        "",
        "| rank | size kB | validate ms | one device: median ms | p95 ms "
        f"| {DEVICES} devices at once: median ms | p95 ms | uploads/s | MB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["uploads"]:
        one, many = row["sequential"], row["concurrent"]
        lines.append(
            f"| {row['rank']} | {row['size_bytes'] / 1e3:,.0f} | "
            f"{ms(row['validate']['median_s'])} | {ms(one['median_s'])} | "
            f"{ms(one['p95_s'])} | {ms(many['median_s'])} | {ms(many['p95_s'])} | "
            f"{many['uploads_per_s']:.1f} | {many['mb_per_s']:.2f} |"
        )
    lines += ["", "![aggregation time against updates](bench_federation.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    counts = [row["updates"] for row in report["aggregation"]]
    for key, marker in (("exact", "o"), ("fedavg", "s"), ("streamed_exact", "^")):
        axis.plot(
            counts,
            [row[key]["median_s"] for row in report["aggregation"]],
            marker=marker,
            label=key.replace("_", " "),
        )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="updates aggregated",
        ylabel="seconds (median)",
        title=f"Aggregating rank-{RANK} updates into one adapter",
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--counts", type=int, nargs="+", default=list(UPDATE_COUNTS))
    common_arguments(parser)
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(
            json.loads((args.out / "bench_federation.json").read_text()),
            args.out,
            "bench_federation",
            markdown=markdown,
            plot=plot,
        )
        return
    torch.set_num_threads(args.threads)
    base = load_base_model()
    with tempfile.TemporaryDirectory() as scratch:
        with embedded_backends(Path(scratch) / "backends") as (_, store):
            aggregation = bench_aggregation(base, store, sorted(args.counts), args.repeats)
        uploads = bench_uploads(base, Path(scratch) / "stack", args.repeats)
    report = {
        "machine": machine(args.threads),
        "torch": torch.__version__,
        "target_layers": len(base.lora_spec.modules),
        "repeats": args.repeats,
        "aggregation": aggregation,
        "uploads": uploads,
    }
    write_report(report, args.out, "bench_federation", markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
