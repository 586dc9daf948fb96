"""Small helpers of the federation API tests: rounds, LoRA files, uploads, the queue."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import redis
from fastapi.testclient import TestClient
from httpx2 import Response  # what Starlette's TestClient returns
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tessera.events import AGGREGATION_QUEUE
from tessera.federation import update_key
from tessera.lora import LoraAdapter, LoraSpec, adapter_to_bytes, random_adapter
from tessera.models import Update
from tessera.storage import ObjectStore
from tests.helpers import bearer


def lora(spec: LoraSpec, seed: int = 0, rank: int = 4) -> LoraAdapter:
    return random_adapter(spec, rank=rank, alpha=float(rank), seed=seed)


def lora_file(spec: LoraSpec, seed: int = 0, **changes: Any) -> bytes:
    """A valid adapter file for `spec`, or one with `changes` made to the adapter."""
    adapter = lora(spec, seed)
    if changes:
        adapter = dataclasses.replace(adapter, **changes)
    return adapter_to_bytes(adapter)


def open_round(client: TestClient, operator: dict[str, str], **config: Any) -> dict:
    response = client.post("/v1/rounds", json=config, headers=operator)
    assert response.status_code == 201, response.text
    return response.json()


def upload(
    client: TestClient,
    token: str,
    round_id: int,
    client_id: int,
    data: bytes,
    **params: Any,
) -> Response:
    params = {"num_samples": 16, **params}
    return client.put(
        f"/v1/rounds/{round_id}/updates/{client_id}",
        content=data,
        params=params,
        headers={**bearer(token), "Content-Type": "application/octet-stream"},
    )


def queued_tasks(broker: redis.Redis) -> list[tuple[str, list]]:
    """(task name, args) of every message waiting on the aggregation queue, oldest first."""
    tasks = []
    raw_messages: list[bytes] = broker.lrange(AGGREGATION_QUEUE, 0, -1)  # type: ignore[assignment]
    for raw in reversed(raw_messages):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], body[0]))
    return tasks


def update_rows(session: Session, round_id: int) -> int:
    session.expire_all()
    return session.scalar(select(func.count()).where(Update.round_id == round_id)) or 0


def nothing_stored(session: Session, store: ObjectStore, round_id: int, client_id: int) -> bool:
    prefix = update_key(round_id, client_id, "").rsplit("/", 1)[0]
    return update_rows(session, round_id) == 0 and not store.list_keys(prefix + "/")
