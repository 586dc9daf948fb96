"""`/metrics` of a Celery worker: what all its pool processes record, served by its main process.

Celery's prefork pool does the work (aggregation, generation) in child processes, which no
HTTP server can reach. In Prometheus' multiprocess mode each process writes its values to
files in one folder, `PROMETHEUS_MULTIPROC_DIR`, and one collector adds them up. The folder:

- must be in the worker's environment before it starts: prometheus_client reads the variable
  once, at import;
- must belong to one worker (an `emptyDir` per pod in Kubernetes, a tmpfs in compose, a folder
  per worker in `tessera up`);
- is emptied by the worker's main process at start, before the pool forks, so that the values
  of processes from an earlier run are not added in.

Once the worker is ready, its main process serves the sum on `TESSERA_WORKER_METRICS_PORT`
(0: no server). Without the folder it serves its own registry only, and says so in the log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery.signals import (
    celeryd_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from tessera.config import get_settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_server: Any = None


def multiprocess_dir() -> Path | None:
    """The folder of multiprocess mode, if this worker's environment names one."""
    folder = os.environ.get(MULTIPROC_ENV)
    return Path(folder) if folder else None


def clear(folder: Path) -> int:
    """Delete the value files of earlier processes; how many there were."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = list(folder.glob("*.db"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def registry() -> Any:
    """What `/metrics` shows: the sum over every process writing to the folder, else our own."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if multiprocess_dir() is None:
        return REGISTRY
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)
    return combined


def serve(port: int, service: str) -> None:
    """Start the `/metrics` HTTP server of this (main) process, once."""
    global _server
    from prometheus_client import start_http_server

    if port == 0 or _server is not None:
        return
    _server, _ = start_http_server(port, addr="0.0.0.0", registry=registry())
    mode = "every pool process" if multiprocess_dir() else "the main process only"
    log.info("%s serves /metrics on port %d (%s)", service, port, mode)
    if multiprocess_dir() is None:
        log.warning(
            f"{MULTIPROC_ENV} is not set: metrics recorded in pool processes (where the "
            "tasks run) are not exported; set it to a folder private to this worker"
        )


def stop() -> None:
    global _server
    if _server is not None:
        _server.shutdown()
        _server = None


def connect(service: str) -> None:
    """Hook the metrics into this process's Celery signals (call once, in the app module)."""

    def on_init(**_kwargs: Any) -> None:
        folder = multiprocess_dir()
        if folder is not None:
            cleared = clear(folder)
            log.info("%s metrics in %s (%d stale files removed)", service, folder, cleared)

    def on_ready(**_kwargs: Any) -> None:
        serve(get_settings().worker_metrics_port, service)

    def on_process_shutdown(**_kwargs: Any) -> None:
        if multiprocess_dir() is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # its live gauges stop counting

    def on_shutdown(**_kwargs: Any) -> None:
        stop()

    celeryd_init.connect(on_init, weak=False)
    worker_ready.connect(on_ready, weak=False)
    worker_process_shutdown.connect(on_process_shutdown, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
