"""`tessera up` / `down` as an operator runs them: every service ready, no process left after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tessera import procs
from tests.helpers import REPO_ROOT, run_cli, stack_env

pytestmark = pytest.mark.slow


def _processes_of(data_dir: Path) -> list[int]:
    """Live processes that inherited this stack's data dir (children, grandchildren)."""
    marker = f"TESSERA_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _wait_for_no_processes(data_dir: Path, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_of(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_up_detached_status_enrol_down(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "stack")

    up = run_cli("up", "--detach", env=env)
    state = json.loads((tmp_path / "stack" / "stack.json").read_text())
    status = run_cli("status", env=env)
    enrolled = run_cli("client", "enrol", "edge-07", env=env)
    console_url = state["urls"]["aggregator"] + "/console/"
    console = httpx.get(console_url + "signin", timeout=10)
    running = _processes_of(tmp_path / "stack")
    down = run_cli("down", env=env)
    left = _wait_for_no_processes(tmp_path / "stack")

    assert up.returncode == 0, up.stderr + up.stdout
    assert "operator token" in up.stdout
    assert f"console     {console_url}" in up.stdout
    assert console.status_code == 200 and "Operator token" in console.text
    assert status.returncode == 0, status.stdout
    assert status.stdout.count(" ready ") == 3
    assert json.loads(enrolled.stdout)["name"] == "edge-07"
    assert len(running) >= 6  # supervisor, valkey, weed, worker (+pool), three services
    assert down.returncode == 0 and "stopped" in down.stdout
    assert left == []
    assert not (tmp_path / "stack" / "stack.json").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{state['urls']['aggregator']}/healthz")


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_foreground_stack_leaves_no_orphans(tmp_path: Path, how: str) -> None:
    data_dir = tmp_path / "stack"
    env = stack_env(data_dir)
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "tessera.cli", "up"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        procs.wait_until(
            (data_dir / "stack.json").exists, timeout=180, what="tessera up", process=supervisor
        )
        started = _processes_of(data_dir)
        supervisor.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
        supervisor.wait(timeout=60)
        left = _wait_for_no_processes(data_dir)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()

    assert len(started) >= 6
    assert left == [], f"orphans after {how}: {left}"
