"""The whole system on one machine: backends, migrations, three services and two workers.

`tessera up` runs a `Stack` in the foreground (Ctrl-C stops it) or detached, in which case a
state file in the data dir lets `tessera down` find and stop it. Every child dies with the
supervisor, whatever way it ends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tessera import db, procs
from tessera.config import Settings
from tessera.devstack import DevStack
from tessera.events import AGGREGATION_QUEUE, INFERENCE_QUEUE

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
# A process that exits more than MAX_RESTARTS times within RESTART_WINDOW_S is left down;
# crashes further apart than that are restarted however many there are over the stack's life.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0

SERVICE_APPS = {
    "aggregator": "services.aggregator.main:create_app",
    "clustering": "services.clustering.main:create_app",
    "inference": "services.inference.api.main:create_app",
}


WORKER_APP = "services.worker.app"
INFERENCE_WORKER_APP = "services.inference.worker.app"


def worker_command(
    *,
    queues: list[str],
    concurrency: int,
    name: str,
    log_level: str = "INFO",
    app: str = WORKER_APP,
) -> list[str]:
    """The command line of a Celery worker process of `app` serving `queues`."""
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--queues", ",".join(queues), "--concurrency", str(concurrency), "--pool", "prefork",
        "--hostname", f"{name}@%h", "--loglevel", log_level.upper(),
    ]  # fmt: skip


@dataclass
class RestartBudget:
    """At most `limit` restarts within any `window_s` seconds; once over, none any more."""

    limit: int = MAX_RESTARTS
    window_s: float = RESTART_WINDOW_S
    times: deque[float] = field(default_factory=deque)
    exhausted: bool = False

    def take(self, now: float) -> bool:
        """Whether a restart at `now` is allowed; if so, it is counted."""
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        if self.exhausted or len(self.times) >= self.limit:
            self.exhausted = True
            return False
        self.times.append(now)
        return True


@dataclass
class Child:
    """A process the supervisor owns, with what it takes to start it again."""

    name: str
    argv: list[str]
    log_path: Path
    ready_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's environment
    process: subprocess.Popen[bytes] | None = None
    restarts: RestartBudget = field(default_factory=RestartBudget)

    def start(self, env: dict[str, str]) -> None:
        self.process = procs.spawn(self.argv, log_path=self.log_path, env={**env, **self.env})


@dataclass
class StackInfo:
    """What `tessera up` prints and writes to the state file."""

    pid: int
    urls: dict[str, str]
    operator_token: str
    data_dir: str
    log_dir: str
    backends: dict[str, str]
    metrics: dict[str, str] = field(default_factory=dict)  # each worker's /metrics URL

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def state_path(settings: Settings) -> Path:
    return settings.data_dir / "stack.json"


def service_urls(settings: Settings) -> dict[str, str]:
    """Where each HTTP service runs, by name."""
    return {
        "aggregator": settings.aggregator_url,
        "clustering": settings.clustering_url,
        "inference": settings.inference_url,
    }


def console_url(urls: dict[str, str]) -> str:
    """The operator console: pages mounted in the aggregator."""
    return f"{urls['aggregator']}/console/"


@dataclass
class Stack:
    """Starts and supervises everything; `stop()` tears it down in reverse order."""

    settings: Settings
    devstack: DevStack = field(init=False)
    children: list[Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    info: StackInfo | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.devstack = DevStack(self.settings)

    @property
    def log_dir(self) -> Path:
        return (self.settings.data_dir / "logs").resolve()

    def start(self) -> StackInfo:
        data_dir = self.settings.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            backends = self.devstack.start()
            # No TESSERA_* variable leaks from this process's environment: the children read
            # exactly these settings and the backends started for them.
            self.env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")},
                **self.settings.as_env(),
                **backends,
                "TESSERA_DATA_DIR": str(data_dir),
                "PYTHONUNBUFFERED": "1",
            }
            db.upgrade(backends["TESSERA_DATABASE_URL"])
            self.children = self._plan_children()
            for child in self.children:
                child.start(self.env)
            for child in self.children:
                self._wait_ready(child)
        except BaseException:
            self.stop()
            raise
        self.info = StackInfo(
            pid=os.getpid(),
            urls=service_urls(self.settings),
            operator_token=self.settings.operator_token.get_secret_value(),
            data_dir=str(data_dir),
            log_dir=str(self.log_dir),
            backends={k: _redact(v) for k, v in backends.items()},
            metrics={
                child.name: f"http://127.0.0.1:{child.env['TESSERA_WORKER_METRICS_PORT']}/metrics"
                for child in self.children
                if "TESSERA_WORKER_METRICS_PORT" in child.env
            },
        )
        return self.info

    def _plan_children(self) -> list[Child]:
        python = sys.executable
        children = []
        for name, url in service_urls(self.settings).items():
            parts = urlsplit(url)
            argv = [
                python,
                "-m",
                "uvicorn",
                "--factory",
                SERVICE_APPS[name],
                "--host",
                parts.hostname or "127.0.0.1",
                "--port",
                str(parts.port or 80),
                "--no-access-log",
            ]
            if name == "aggregator" and self.settings.aggregator_replicas > 1:
                argv += ["--workers", str(self.settings.aggregator_replicas)]
            children.append(
                Child(name, argv, self.log_dir / f"{name}.log", ready_url=f"{url}/readyz")
            )
        worker = worker_command(
            queues=[AGGREGATION_QUEUE],
            concurrency=self.settings.worker_concurrency,
            name=f"worker-{os.getpid()}",
            log_level=self.settings.log_level,
        )
        inference_worker = worker_command(
            queues=[INFERENCE_QUEUE],
            concurrency=self.settings.worker_concurrency,
            name=f"inference-worker-{os.getpid()}",
            log_level=self.settings.log_level,
            app=INFERENCE_WORKER_APP,
        )
        taken = {urlsplit(url).port or 80 for url in service_urls(self.settings).values()}
        metrics_ports = procs.free_ports(2, exclude=taken)
        # The workers first: the aggregator is ready only once a worker answers.
        return [
            Child(
                "worker",
                worker,
                self.log_dir / "worker.log",
                env=self._metrics_env("worker", metrics_ports[0]),
            ),
            Child(
                "inference-worker",
                inference_worker,
                self.log_dir / "inference-worker.log",
                env=self._metrics_env("inference-worker", metrics_ports[1]),
            ),
            *children,
        ]

    def _metrics_env(self, name: str, port: int) -> dict[str, str]:
        """A worker's own multiprocess-metrics folder, and a free port for its /metrics."""
        if self.settings.worker_metrics_port == 0:
            return {"TESSERA_WORKER_METRICS_PORT": "0"}
        return {
            "PROMETHEUS_MULTIPROC_DIR": str(self.settings.data_dir.resolve() / "metrics" / name),
            "TESSERA_WORKER_METRICS_PORT": str(port),
        }

    def _wait_ready(self, child: Child) -> None:
        if child.ready_url is None:
            return
        url = child.ready_url
        procs.wait_until(
            lambda: httpx.get(url, timeout=5).status_code == 200,
            timeout=READY_TIMEOUT_S,
            what=f"the {child.name} service ({url})",
            process=child.process,
            log_path=child.log_path,
            interval=0.5,
        )

    def supervise(self) -> None:
        """Block until asked to stop, restarting an embedded server or a child that exits
        (at most MAX_RESTARTS times within RESTART_WINDOW_S each, then it is left down)."""
        budgets = {"valkey": RestartBudget(), "seaweedfs": RestartBudget()}
        while not self._stopping.wait(1.0):
            servers = {"valkey": self.devstack.valkey, "seaweedfs": self.devstack.seaweed}
            for name, server in servers.items():
                if server is None or server.process is None or server.process.poll() is None:
                    continue
                if self._may_restart(name, server.process, budgets[name]):
                    try:
                        server.start()  # same data dir, same client port
                    except Exception:  # it exited again: the next pass counts that restart
                        log.exception("%s did not come back", name)
            for child in self.children:
                if child.process is None or child.process.poll() is None:
                    continue
                if self._may_restart(child.name, child.process, child.restarts):
                    child.start(self.env)

    def _may_restart(
        self, name: str, process: subprocess.Popen[bytes], budget: RestartBudget
    ) -> bool:
        if self._stopping.is_set():
            return False
        was_exhausted = budget.exhausted
        if not budget.take(time.monotonic()):
            if not was_exhausted:
                log.error(
                    "%s exited more than %d times within %.0f s; leaving it down",
                    name, budget.limit, budget.window_s,
                )  # fmt: skip
            return False
        log.warning(
            "%s exited with code %s; restarting (%d within %.0f s)",
            name, process.returncode, len(budget.times), budget.window_s,
        )  # fmt: skip
        return True

    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()
        for child in reversed(self.children):
            if child.process is not None:
                procs.stop(child.process)
        self.devstack.stop()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def run_foreground(settings: Settings, *, on_ready: object = None) -> None:
    """`tessera up`: start, write the state file, supervise until SIGINT/SIGTERM, tear down."""
    stack = Stack(settings)
    previous = {
        signum: signal.signal(signum, lambda *_: stack.request_stop())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    path = state_path(settings)
    try:
        info = stack.start()
        path.write_text(info.to_json())
        if callable(on_ready):
            on_ready(info)
        stack.supervise()
    finally:
        stack.stop()
        path.unlink(missing_ok=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_detached(
    settings: Settings,
    *,
    timeout: float = READY_TIMEOUT_S * 2,
    env: Mapping[str, str] | None = None,
) -> StackInfo:
    """`tessera up --detach`: run the supervisor in the background; return once it is ready.
    `env` (default: this process's) must make the supervisor read the same `settings`."""
    path = state_path(settings)
    if path.exists():
        existing = read_state(settings)
        if existing is not None and _alive(existing.pid):
            raise RuntimeError(f"a stack is already running (pid {existing.pid}); `tessera down`")
        path.unlink()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "tessera.cli", "up"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=None if env is None else dict(env),
        )
    procs.wait_until(
        path.exists,
        timeout=timeout,
        what="the stack",
        process=supervisor,
        log_path=log_path,
        interval=0.5,
    )
    info = read_state(settings)
    assert info is not None
    return info


def read_state(settings: Settings) -> StackInfo | None:
    path = state_path(settings)
    if not path.exists():
        return None
    return StackInfo(**json.loads(path.read_text()))


def stop_detached(settings: Settings, *, timeout: float = 60.0) -> bool:
    """`tessera down`: stop the stack the state file names; False if none was running."""
    info = read_state(settings)
    if info is None or not _alive(info.pid):
        state_path(settings).unlink(missing_ok=True)
        return False
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(info.pid):
        # Its children get SIGTERM from the kernel when it dies (PR_SET_PDEATHSIG).
        os.kill(info.pid, signal.SIGKILL)
    state_path(settings).unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
