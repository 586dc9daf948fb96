"""Real Celery worker processes for fault tests: started, killed, and stopped at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

from tessera import procs
from tessera.config import Settings
from tessera.queue import make_celery
from tessera.stack import worker_command

# A queue no task is sent to: a standby worker waits on it until it is told to join the real one.
STANDBY_QUEUE = "standby"


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

    def close(self) -> None:
        for process in self.started:
            procs.stop(process)
        self.celery.close()
