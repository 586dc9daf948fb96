"""An ASGI app on a real HTTP server (uvicorn): in a thread of the test process, or in a
process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tessera import procs
from tessera.config import Settings
from tests.helpers import REPO_ROOT


@contextmanager
def served(app: FastAPI, **options: Any) -> Iterator[str]:
    """`app` on a free port until the block ends; its base URL. `options` go to uvicorn's
    Config (e.g. `access_log=True, log_level="info", log_config=None` to capture its logs)."""
    port = procs.free_ports(1)[0]
    config = uvicorn.Config(
        app,
        **{"host": "127.0.0.1", "port": port, "log_level": "warning", "lifespan": "on", **options},
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        procs.wait_until(
            lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
            timeout=30,
            what="the app",
        )
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def served_process(
    factory: str, settings: Settings, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The app `factory` makes (`module:function`) under `settings`, in a uvicorn process on a
    free port until the block ends; its base URL and the process."""
    port = procs.free_ports(1)[0]
    process = procs.spawn(
        [sys.executable, "-m", "uvicorn", "--factory", factory,
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        log_path=log_path, env={**os.environ, **settings.as_env()}, cwd=REPO_ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        procs.wait_until(
            lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
            timeout=120, what=factory, process=process, log_path=log_path,
        )  # fmt: skip
        yield url, process
    finally:
        procs.stop(process)
