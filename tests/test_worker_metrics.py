"""A worker's /metrics adds up what its pool processes recorded (Prometheus multiprocess mode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tessera import procs, worker_metrics
from tests.helpers import metric_values

# What a pool process does: record metrics, with the folder set in its environment.
RECORD = """
from tessera.metrics import ADAPTER_CACHE_BYTES, AGGREGATION_SECONDS
AGGREGATION_SECONDS.observe(1.5)
ADAPTER_CACHE_BYTES.set(1000)
"""


def record_in_another_process(folder: Path) -> None:
    env = {**os.environ, worker_metrics.MULTIPROC_ENV: str(folder)}
    subprocess.run([sys.executable, "-c", RECORD], env=env, check=True)


def test_the_main_process_serves_the_sum_of_its_pool_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "made-by-the-first-process"  # as on a fresh emptyDir
    monkeypatch.setenv(worker_metrics.MULTIPROC_ENV, str(folder))
    record_in_another_process(folder)
    record_in_another_process(folder)
    port = procs.free_port()

    worker_metrics.serve(port, "test-worker")
    try:
        values = metric_values(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
    finally:
        worker_metrics.stop()

    assert values["tessera_aggregation_seconds_count"] == 2
    assert values["tessera_aggregation_seconds_sum"] == 3.0
    # `livesum`: those processes have exited but were not marked dead, so both still count.
    assert values["tessera_adapter_cache_bytes"] == 2000


def test_a_restarted_worker_starts_from_zero(tmp_path: Path) -> None:
    record_in_another_process(tmp_path)
    (tmp_path / "unrelated.txt").write_text("kept")

    assert worker_metrics.clear(tmp_path) >= 1

    assert [p.name for p in tmp_path.iterdir()] == ["unrelated.txt"]


def test_without_the_folder_it_serves_its_own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import REGISTRY

    monkeypatch.delenv(worker_metrics.MULTIPROC_ENV, raising=False)

    assert worker_metrics.registry() is REGISTRY
