"""Cost of secure mode: bytes and seconds per device and phase, on a running stack over HTTP.

    python bench/secure_cost.py --out docs

Starts the stack as `tessera up` does (uvicorn aggregator, Celery worker, SQLite, SeaweedFS,
Valkey), enrols `--devices` devices with the SDK, places them in one cluster (rows written
to the stack's database: clustering is not what is measured), opens a secure round on the
bundled model's LoRA targets at `--rank`, and runs every device's `SecureRound` steps in its own
thread with a frozen-A adapter of random B. Measured per device: the seconds of its own steps
(compute and request), the bytes of those requests and responses (`Traffic`), and, apart, the
bytes of its state polls; per phase: the wall time from its start to the cluster moving on; for
the worker: the unmasking of the cluster's sum; and the whole round, open to published. A
second run drops devices (one before its masked input, one after it), so the phases they miss
wait out `phase_s` and the worker removes their masks. Writes docs/bench_secure_cost.json.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from benchlib import machine

from services.worker.tasks.federation import lora_spec_of
from tessera import db, procs
from tessera.devstack import embedded_settings
from tessera.lora import LoraAdapter, adapter_to_bytes
from tessera.models import Assignment, Cluster, Clustering
from tessera.sdk.device import DeviceClient
from tessera.sdk.secure import SecureRound
from tessera.secagg.vector import frozen_adapter, vector_length
from tessera.stack import Stack

STEPS = ("keys", "shares", "masked", "reveal")
NEXT_PHASE = {"keys": "shares", "shares": "masked", "masked": "unmasking", "reveal": "ready"}


def place_in_one_cluster(database_url: str, client_ids: list[int]) -> None:
    engine = db.create_db_engine(database_url)
    with db.session_factory(engine)() as session:
        clustering = Clustering(version=1, algorithm="bench")
        session.add(clustering)
        session.flush()
        session.add(
            Cluster(clustering_id=clustering.id, label=0, centroid=b"\0" * 16, size=len(client_ids))
        )
        for client_id in client_ids:
            session.add(Assignment(clustering_id=clustering.id, client_id=client_id, label=0))
        session.commit()
    engine.dispose()


def trained(secure: SecureRound, seed: int) -> LoraAdapter:
    start = secure.start_adapter()
    generator = torch.Generator().manual_seed(seed)
    b = {m: torch.randn(start.pair(m)[1].shape, generator=generator) * 0.01 for m in start.modules}
    a = {m: start.pair(m)[0] for m in start.modules}
    return frozen_adapter(secure.spec, a, b, rank=start.rank, alpha=start.alpha)


class Device(threading.Thread):
    """One device's run through the protocol, stopping before `drop_before` (None: never)."""

    def __init__(self, secure: SecureRound, update: LoraAdapter, drop_before: str | None):
        super().__init__()
        self.secure, self.update, self.drop_before = secure, update, drop_before
        self.seconds: dict[str, float] = {}
        self.bytes_up = self.bytes_down = 0
        self.reached: dict[str, float] = {}  # phase -> when this device saw it start
        self.error: str | None = None

    def step(self, name: str) -> bool:
        if name == self.drop_before:
            return False
        traffic = self.secure.device.traffic
        up, down, started = traffic.up, traffic.down, time.perf_counter()
        if name == "keys":
            self.secure.send_keys()
        elif name == "shares":
            self.secure.send_shares()
        elif name == "masked":
            self.secure.send_masked(self.update, num_samples=64)
        else:
            self.secure.send_reveal()
        self.seconds[name] = time.perf_counter() - started
        self.bytes_up += traffic.up - up
        self.bytes_down += traffic.down - down
        self.secure.wait(NEXT_PHASE[name], timeout_s=600, poll_s=0.05)
        self.reached[NEXT_PHASE[name]] = time.perf_counter()
        return True

    def run(self) -> None:
        try:
            for name in STEPS:
                if not self.step(name):
                    return
        except Exception as error:  # reported, not raised: the other threads go on
            self.error = f"{type(error).__name__}: {error}"


def run_round(
    urls: dict[str, str],
    token: str,
    devices: list[DeviceClient],
    args: argparse.Namespace,
    drops: dict[int, str],
) -> dict[str, Any]:
    spec = lora_spec_of(args.model, args.targets)
    operator = {"Authorization": f"Bearer {token}"}
    config = {
        "method": "secure",
        "lam": 0.0,
        "rank": args.rank,
        "secure": {"threshold": args.threshold, "phase_s": args.phase_s},
    }
    opened = time.perf_counter()
    response = httpx.post(f"{urls['aggregator']}/v1/rounds", json=config, headers=operator)
    response.raise_for_status()
    round_id = int(response.json()["id"])
    for device in devices:
        device.traffic.up = device.traffic.down = 0
    secures = [SecureRound(d, round_id, spec=spec) for d in devices]
    threads = [Device(s, trained(s, i), drops.get(i)) for i, s in enumerate(secures)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    while True:
        seen = httpx.get(f"{urls['aggregator']}/v1/rounds/{round_id}", headers=operator).json()
        if seen["state"] in ("published", "failed"):
            break
        time.sleep(0.1)
    finished = time.perf_counter()
    errors = [t.error for t in threads if t.error]
    if errors or seen["state"] != "published":
        raise RuntimeError(f"round {round_id} is {seen['state']} ({seen.get('error')}): {errors}")
    survivors = [t for t in threads if t.drop_before is None]
    phase_end = {
        phase: max(t.reached[phase] for t in survivors if phase in t.reached)
        for phase in NEXT_PHASE.values()
    }
    # a step's phase starts when the previous step's phase ended
    starts = {"keys": started, **{s: phase_end[NEXT_PHASE[p]] for p, s in pairwise(STEPS)}}
    phases = {step: round(phase_end[NEXT_PHASE[step]] - starts[step], 3) for step in STEPS}
    (cluster,) = seen["report"]["clusters"] if seen.get("report") else [{}]
    return {
        "round_id": round_id,
        "state": seen["state"],
        "drops": {str(devices[i].client_id): step for i, step in drops.items()},
        "vector_values": vector_length(spec, rank=args.rank),
        "plain_update_bytes": len(adapter_to_bytes(threads[0].update)),
        "device_seconds": {
            step: round(float(np.mean([t.seconds[step] for t in threads if step in t.seconds])), 4)
            for step in STEPS
        },
        "bytes_up": int(np.mean([t.bytes_up for t in survivors])),
        "bytes_down": int(np.mean([t.bytes_down for t in survivors])),
        "poll_bytes_down": int(
            np.mean([t.secure.device.traffic.down - t.bytes_down for t in survivors])
        ),
        "phase_seconds": phases,
        "unmask_seconds": cluster.get("unmask_s"),
        "cluster": cluster,
        "open_to_published_s": round(finished - opened, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threshold", type=int, default=5)
    parser.add_argument("--phase-s", type=float, default=30.0)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    folder = args.data_dir or Path(f"/tmp/tessera-secure-bench-{int(time.time())}")
    ports = procs.free_ports(3)
    settings = embedded_settings(
        folder,
        aggregator_url=f"http://127.0.0.1:{ports[0]}",
        clustering_url=f"http://127.0.0.1:{ports[1]}",
        inference_url=f"http://127.0.0.1:{ports[2]}",
    )
    args.model, args.targets = settings.base_model, settings.lora_targets
    stack = Stack(settings)
    try:
        info = stack.start()
        devices = [
            DeviceClient.enrol(
                aggregator_url=info.urls["aggregator"],
                operator_token=info.operator_token,
                name=f"secure-bench-{i}",
            )
            for i in range(args.devices)
        ]
        place_in_one_cluster(info.backends["TESSERA_DATABASE_URL"], [d.client_id for d in devices])
        runs = {
            "all": run_round(info.urls, info.operator_token, devices, args, {}),
            "two_drop": run_round(
                info.urls, info.operator_token, devices, args, {1: "masked", 2: "reveal"}
            ),
        }
    finally:
        stack.stop()
    report = {
        "runs": runs,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "machine": machine(1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_secure_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
