"""Removing a client with everything it left: task vectors, updates, assignments, its personal
adapters and generation jobs, and their objects in the store.

The client is disabled first (committed), so nothing new arrives while its objects go; then its
objects are deleted, then its row, whose foreign keys cascade to every row it owns. If the store
fails half-way, the call fails (503) with the client disabled and its rows in place: calling it
again deletes the rest. What it contributed to adapters already published stays in them.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from services.aggregator import crud
from tessera.federation import update_prefix
from tessera.models import (
    Adapter,
    AdapterVersion,
    Assignment,
    Client,
    GenerationJob,
    TaskEmbedding,
    Update,
)
from tessera.schemas import ClientRemoved
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)


def remove_client(*, session: Session, store: ObjectStore, client: Client) -> ClientRemoved:
    """Delete `client`, its rows and its objects; what was deleted."""
    client_id = client.id
    crud.set_disabled(session=session, client=client, disabled=True)
    session.commit()
    keys = _object_keys(session, store, client_id)
    for key in sorted(keys):
        store.delete(key)  # a StorageError is a 503: the client stays disabled, retry

    def count(model: type[TaskEmbedding | Update | Assignment | Adapter | GenerationJob]) -> int:
        return session.scalar(select(func.count()).where(model.client_id == client_id)) or 0

    removed = ClientRemoved(
        client_id=client_id,
        task_vectors=count(TaskEmbedding),
        updates=count(Update),
        assignments=count(Assignment),
        adapters=count(Adapter),
        generation_jobs=count(GenerationJob),
        objects=len(keys),
    )
    session.execute(delete(Client).where(Client.id == client_id))  # rows cascade
    session.commit()
    log.warning("client removed", extra=removed.model_dump())
    return removed


def _object_keys(session: Session, store: ObjectStore, client_id: int) -> set[str]:
    """Every object the client's rows name, and its update objects no row names any more."""
    keys: set[str] = set()
    updates: list[Update] = list(
        session.scalars(select(Update).where(Update.client_id == client_id))
    )
    for row in updates:
        keys.add(row.object_key)
        keys.update(store.list_keys(f"{update_prefix(row.round_id)}client-{client_id}/"))
    keys.update(
        session.scalars(
            select(AdapterVersion.object_key)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(Adapter.client_id == client_id)
        )
    )
    jobs: list[GenerationJob] = list(
        session.scalars(select(GenerationJob).where(GenerationJob.client_id == client_id))
    )
    for job in jobs:
        keys.update(key for key in [job.input_key, job.result.get("latents_key")] if key)
        keys.update(job.result.get("images") or [])
    return keys
