"""An ASGI app on a real HTTP server (uvicorn) in a thread of the test process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tessera import procs


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
