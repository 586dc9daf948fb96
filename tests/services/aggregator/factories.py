"""Rows the worker and the clustering service would write, made directly for the tests."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tessera.models import Adapter, AdapterKind, AdapterVersion, Assignment, Cluster, Clustering
from tessera.storage import ObjectStore


def make_clustering(session: Session, labels: dict[int, int]) -> Clustering:
    """A clustering version placing each client id in its label."""
    version = (session.scalar(select(func.max(Clustering.version))) or 0) + 1
    clustering = Clustering(version=version, algorithm="test")
    session.add(clustering)
    session.flush()
    for label in sorted(set(labels.values())):
        size = sum(1 for value in labels.values() if value == label)
        session.add(
            Cluster(clustering_id=clustering.id, label=label, centroid=b"\0" * 16, size=size)
        )
    for client_id, label in labels.items():
        session.add(
            Assignment(
                clustering_id=clustering.id, client_id=client_id, label=label, similarity=0.9
            )
        )
    session.commit()
    return clustering


def publish(
    session: Session,
    store: ObjectStore,
    name: str,
    data: bytes,
    *,
    kind: AdapterKind,
    cluster_label: int | None = None,
    client_id: int | None = None,
) -> AdapterVersion:
    """Store `data` as the next version of adapter `name`, as the worker publishes one."""
    adapter = session.scalar(select(Adapter).where(Adapter.name == name))
    if adapter is None:
        adapter = Adapter(name=name, kind=kind, cluster_label=cluster_label, client_id=client_id)
        session.add(adapter)
        session.flush()
    number = (
        session.scalar(
            select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter.id)
        )
        or 0
    ) + 1
    key = f"adapters/{name.replace(':', '-')}/test-{number}.safetensors"
    stored = store.put_bytes(key, data)
    version = AdapterVersion(
        adapter_id=adapter.id,
        version=number,
        object_key=key,
        sha256=stored.sha256,
        size_bytes=stored.size,
        rank=4,
        metrics={"energy_kept": 0.99},
    )
    session.add(version)
    session.commit()
    return version
