"""Housekeeping tasks: a ping that proves the queue, a worker and the database work."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Any

from celery import shared_task

from services.worker import context
from tessera import db
from tessera.events import TASK_PING


@shared_task(name=TASK_PING, time_limit=30, soft_time_limit=20)
def ping(payload: str = "") -> dict[str, Any]:
    """Answer with who ran the task and whether its database answers."""
    db.ping(context.resources().engine)
    return {
        "payload": payload,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "at": datetime.now(UTC).isoformat(),
        "database": "ok",
    }
