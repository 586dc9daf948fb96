"""A small federation written straight to the database: devices, task vectors, a clustering."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator import crud
from services.clustering import crud as clustering_crud
from tessera.models import Clustering
from tests.helpers import enrol


@dataclass(frozen=True)
class Federation:
    """The clustering made, and each device as enrolled (id, token) with its true group."""

    clustering: Clustering
    devices: list[tuple[int, dict]]


def federation(
    aggregator: TestClient | httpx.Client,
    operator_token: str,
    session: Session,
    *,
    groups: int = 3,
    per_group: int = 4,
    dim: int = 16,
) -> Federation:
    """`groups` well-separated groups of devices, enrolled through the API, clustered for real."""
    rng = np.random.default_rng(0)
    centres = np.eye(dim)[:groups]
    devices = [
        (group, enrol(aggregator, operator_token, f"edge-{group}-{member}"))  # type: ignore[arg-type]
        for group in range(groups)
        for member in range(per_group)
    ]
    for group, device in devices:  # after the enrolments: SQLite has one writer at a time
        vector = centres[group] + 0.05 * rng.standard_normal(dim)
        vector /= np.linalg.norm(vector)
        crud.replace_task_vectors(
            session=session,
            client_id=device["id"],
            encoder_id="test-encoder",
            vectors=[vector.tolist()],
        )
    clustering = clustering_crud.recluster(session=session, method="kmeans", k=groups)
    session.commit()
    return Federation(clustering, devices)
