"""Devices with task vectors around known directions, and running a queued re-clustering job
in the test's process (the worker's own function)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from services.aggregator import crud as aggregator_crud
from services.worker.clustering import ClusteringScale, run_clustering_job
from tessera import db
from tessera.config import Settings
from tessera.federation import task_vector_bytes
from tessera.models import Client, Role, TaskEmbedding
from tests.helpers import bearer
from tests.services.clustering.synthetic import DIM, directions, unit


def run_here(settings: Settings, job_id: int) -> dict[str, Any]:
    """Run job `job_id` as a worker would (`services.worker.clustering`); what came of it."""
    engine = db.create_db_engine(settings.resolved_database_url)
    try:
        return run_clustering_job(
            job_id,
            sessions=db.session_factory(engine),
            scale=ClusteringScale.from_settings(settings),
            stale_s=settings.task_stale_s,
        )
    finally:
        engine.dispose()


CENTRES = directions(3, seed=7)
ELSEWHERE = unit(np.random.default_rng(3).normal(size=DIM))  # far from every centre


@dataclass(frozen=True)
class Member:
    id: int
    token: str
    truth: int


def add_client(session: Session, settings: Settings, name: str, role: Role = Role.DEVICE) -> Member:
    client, token = aggregator_crud.create_client(
        session=session, name=name, role=role, token_secret=settings.token_secret.get_secret_value()
    )
    session.commit()
    return Member(id=client.id, token=token, truth=-1)


def upload(session: Session, client_id: int, vectors: np.ndarray) -> None:
    """Replace a client's task vectors, as the aggregator's upload does."""
    session.execute(delete(TaskEmbedding).where(TaskEmbedding.client_id == client_id))
    for vector in np.atleast_2d(vectors):
        session.add(
            TaskEmbedding(
                client_id=client_id,
                vector=task_vector_bytes(vector.tolist()),
                dim=vector.shape[0],
                encoder_id="test-encoder",
            )
        )
    session.commit()


def tasks_near(centre: np.ndarray, *, seed: int, count: int = 2, noise: float = 0.03) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit(centre + rng.normal(scale=noise, size=(count, DIM)))


def add_device(
    session: Session, settings: Settings, name: str, centre: int, *, seed: int
) -> Member:
    """A device with task vectors around CENTRES[centre], or around ELSEWHERE for centre -1."""
    member = add_client(session, settings, name)
    upload(session, member.id, tasks_near(ELSEWHERE if centre < 0 else CENTRES[centre], seed=seed))
    return Member(id=member.id, token=member.token, truth=centre)


def operator(settings: Settings) -> dict[str, str]:
    return bearer(settings.operator_token.get_secret_value())


def enrol_many(session: Session, vectors: np.ndarray, *, prefix: str) -> None:
    """One device per row of `vectors`, each with that task vector, inserted in bulk."""
    names = [f"{prefix}-{i}" for i in range(len(vectors))]
    session.execute(
        insert(Client),
        [
            {"name": n, "role": Role.DEVICE, "token_hash": hashlib.sha256(n.encode()).hexdigest()}
            for n in names
        ],
    )
    ids = dict(
        session.execute(select(Client.name, Client.id).where(Client.name.like(f"{prefix}-%"))).all()
    )
    session.execute(
        insert(TaskEmbedding),
        [
            {
                "client_id": ids[name],
                "vector": task_vector_bytes(vector),
                "dim": vector.shape[0],
                "encoder_id": "test-encoder",
            }
            for name, vector in zip(names, vectors, strict=True)
        ],
    )
    session.commit()
