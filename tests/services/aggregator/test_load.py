"""Many devices at once against an aggregator with a small pool: every device finishes, the
overload is answered 503 with Retry-After (never 500), no object is left without its row, and
readiness answers throughout."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tessera.config import Settings
from tessera.federation import update_prefix
from tessera.lora import LoraSpec
from tessera.model.encoder import task_encoder_info
from tessera.models import Update
from tessera.sdk.http import RetryPolicy
from tessera.sim.load import DevicePayloads, run_devices
from tessera.stack import SERVICE_APPS
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.aggregator.helpers import lora_file
from tests.serving import served_process

DEVICES = 200
IN_FLIGHT = 4  # a pool of 8 connections

pytestmark = pytest.mark.xdist_group("timed")  # it bounds /readyz's answer time


@pytest.mark.slow
def test_200_devices_at_once_get_no_500_and_leave_no_orphan(
    settings: Settings,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    worker: None,
    tmp_path: Path,
) -> None:
    small = settings.model_copy(update={"max_requests_in_flight": IN_FLIGHT, "request_queue_s": 0})
    encoder = task_encoder_info(small.task_encoder)
    payloads = DevicePayloads(
        encoder_id=encoder.encoder_id,
        width=encoder.width,
        updates=[lora_file(spec, seed) for seed in range(4)],
    )
    log_path = tmp_path / "aggregator.log"
    with served_process(SERVICE_APPS["aggregator"], small, log_path) as (url, _process):
        opened = httpx.post(
            f"{url}/v1/rounds", json={"min_updates": 10 * DEVICES}, headers=bearer(operator_token)
        )
        assert opened.status_code == 201, opened.text
        round_id = opened.json()["id"]
        probes: list[tuple[float, dict]] = []
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                started = time.perf_counter()
                answer = httpx.get(f"{url}/readyz", timeout=60).json()
                probes.append((time.perf_counter() - started, answer["checks"]))
                done.wait(0.5)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            report = asyncio.run(
                run_devices(
                    url=url,
                    operator_token=operator_token,
                    round_id=round_id,
                    payloads=payloads,
                    devices=DEVICES,
                    name_prefix="load",
                    policy=RetryPolicy(attempts=60),
                    lockstep=True,
                )
            )
        finally:
            done.set()
            prober.join()
        after = httpx.get(f"{url}/readyz", timeout=30).json()["checks"]

    print(report.summary())
    assert report.errors() == 0, report.summary()
    assert report.finished == DEVICES
    codes = {code for _, code in report.statuses}
    assert codes <= {200, 201, 503}, report.summary()  # never a 500
    assert report.answered(503) > 0  # the small pool was overloaded, and said so
    rows = session.scalars(select(Update).where(Update.round_id == round_id)).all()
    assert {row.client_id: row.sha256 for row in rows} == report.accepted
    stored = set(store.list_keys(update_prefix(round_id)))
    assert stored == {row.object_key for row in rows}  # no orphan, none missing
    assert probes and all(checks["database"] == "ok" for _, checks in probes), probes
    assert max(seconds for seconds, _ in probes) < 5, probes
    assert after["database"] == "ok"
