"""Real Celery worker processes for fault tests: started, killed, and stopped at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tessera import procs
from tessera.config import Settings
from tessera.queue import make_celery
from tessera.stack import worker_command

# A queue no task is sent to: a standby worker waits on it until it is told to join the real one.
STANDBY_QUEUE = "standby"


def quick_to_recover(settings: Settings, *, stale_s: float) -> Settings:
    """`settings` under which a dead worker's round or job is noticed within seconds: its
    heartbeat is stale after `stale_s`, the services' loops run every 0.2 s (and the workers
    serve no metrics port, which several would contend for)."""
    return settings.model_copy(
        update={"task_stale_s": stale_s, "housekeeping_interval_s": 0.2, "worker_metrics_port": 0}
    )


class WorkerProcesses:
    """Workers of Celery app `app` on `settings`' Redis, each stopped when the test ends."""

    def __init__(self, settings: Settings, logs: Path, *, app: str) -> None:
        # One intra-op thread, as the tests run models: on shared, busy cores two threads make
        # the small UNet and the SVDs tens of times slower.
        self.env = {**os.environ, **settings.as_env(), "OMP_NUM_THREADS": "1"}
        self.logs = logs
        self.app = app
        self.celery = make_celery(settings)
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, queue: str) -> tuple[subprocess.Popen[bytes], str]:
        """Start a worker consuming `queue`; the process and its node name (not yet ready)."""
        name = f"fault-{uuid.uuid4().hex[:8]}"
        command = worker_command(queues=[queue], concurrency=1, name=name, app=self.app)
        process = procs.spawn(command, log_path=self.logs / f"{name}.log", env=self.env)
        self.started.append(process)
        return process, f"{name}@{socket.gethostname()}"

    def wait_ready(self, process: subprocess.Popen[bytes], node: str) -> None:
        procs.wait_until(
            lambda: any(node in reply for reply in self.celery.control.ping(timeout=0.5)),
            timeout=180,
            what=f"worker {node}",
            process=process,
            log_path=self.logs / f"{node.split('@')[0]}.log",
        )

    def join(self, node: str, queue: str) -> None:
        """Make the worker `node` consume `queue` too (a worker coming back)."""
        self.celery.control.add_consumer(queue, destination=[node], reply=True)

    def relay(self, queue: str) -> Relay:
        """A worker on `queue` and a standby, both ready. The standby starts at the same time,
        on a queue of its own, and joins `queue` when told to, as a worker coming back would
        (a start takes too long on a busy machine to be timed as recovery)."""
        first, first_node = self.spawn(queue)
        _, standby_node = standby = self.spawn(STANDBY_QUEUE)
        self.wait_ready(first, first_node)
        self.wait_ready(*standby)
        return Relay(self, queue, first, first_node, standby_node)

    def close(self) -> None:
        for process in self.started:
            procs.stop(process)
        self.celery.close()


@dataclass
class Relay:
    """The worker on `queue` (`first`), to be killed, and the standby that takes over."""

    workers: WorkerProcesses
    queue: str
    first: subprocess.Popen[bytes]
    first_node: str
    standby_node: str

    def kill_first(self) -> float:
        """SIGKILL the first worker and its pool process, mid-task; when (time.monotonic)."""
        os.killpg(self.first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        self.first.wait(10)
        return killed_at

    def replace_first(self) -> None:
        """Start another first worker on `queue` (the last one was killed too late)."""
        self.first, self.first_node = self.workers.spawn(self.queue)
        self.workers.wait_ready(self.first, self.first_node)

    def bring_standby(self) -> float:
        """The standby joins `queue`; when (time.monotonic), recovery's start."""
        self.workers.join(self.standby_node, self.queue)
        return time.monotonic()
