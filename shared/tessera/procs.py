"""Child processes that cannot outlive their parent: spawning, waiting, stopping."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, *, exclude: Collection[int] = ()) -> list[int]:
    """`count` distinct free ports, none of them in `exclude` (ports promised to others)."""
    ports: set[int] = set()
    while len(ports) < count:
        port = free_port()
        if port not in exclude:
            ports.add(port)
    return sorted(ports)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: its own process group, so a Ctrl-C at the
    # terminal reaches only the supervisor, which stops children in order; and SIGTERM from
    # the kernel if the supervisor dies without cleaning up (Linux only).
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log_path`, tied to this process's life.

    Tied, in fact, to the calling thread's: Linux sends the parent-death signal when the thread
    that forked the child ends, so start a long-lived child from a thread that outlives it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=_die_with_parent,
        )


def stop(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL what is left after `timeout`."""
    if process.poll() is not None:
        return
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait(timeout=5)
    # Grandchildren (a Celery pool, say) may outlive a leader that exited first.
    _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll `check` until it returns True; fail early if `process` exits, quoting its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {process.returncode} before it was ready"
                + _log_tail(log_path)
            )
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} was not ready after {timeout:.0f}s" + _log_tail(log_path))


def _log_tail(log_path: Path | None, lines: int = 20) -> str:
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log_path}:\n" + "\n".join(tail)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
