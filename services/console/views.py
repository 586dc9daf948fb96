"""What the console's pages show, read from the database (pure over a session)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.aggregator import crud
from services.clustering import crud as clustering_crud
from tessera.federation import task_vector_from_bytes
from tessera.models import (
    Adapter,
    AdapterVersion,
    Assignment,
    Client,
    Cluster,
    Clustering,
    Role,
    Round,
    Update,
)
from tessera.schemas import RoundOut

RECENT_EVENTS = 12


@dataclass(frozen=True, slots=True)
class DeviceCounts:
    """Enrolled devices; active: enabled and uploaded to the newest round; disabled."""

    enrolled: int
    active: int
    disabled: int


@dataclass(frozen=True, slots=True)
class Event:
    at: datetime
    what: str


def device_counts(*, session: Session) -> DeviceCounts:
    devices = crud.list_clients(session=session, role=Role.DEVICE)
    latest = crud.latest_round(session=session)
    uploaded: set[int] = set()
    if latest is not None:
        uploaded = set(
            session.scalars(select(Update.client_id).where(Update.round_id == latest.id))
        )
    return DeviceCounts(
        enrolled=len(devices),
        active=sum(1 for d in devices if not d.disabled and d.id in uploaded),
        disabled=sum(1 for d in devices if d.disabled),
    )


def recent_events(*, session: Session, limit: int = RECENT_EVENTS) -> list[Event]:
    """The newest things that happened: enrolments, rounds, clusterings, published versions."""
    events: list[Event] = []
    for client in session.scalars(select(Client).order_by(Client.created_at.desc()).limit(limit)):
        events.append(Event(client.created_at, f"{client.role.value} {client.name!r} enrolled"))
    for round_ in session.scalars(select(Round).order_by(Round.id.desc()).limit(limit)):
        events.append(Event(round_.opened_at, f"round {round_.number} opened"))
        if round_.closed_at is not None:
            events.append(
                Event(round_.closed_at, f"round {round_.number} closed ({round_.state.value})")
            )
        if round_.published_at is not None:
            events.append(Event(round_.published_at, f"round {round_.number} published"))
    for clustering in session.scalars(
        select(Clustering).order_by(Clustering.version.desc()).limit(limit)
    ):
        k = clustering.metrics.get("k", "?")
        events.append(
            Event(
                clustering.created_at,
                f"clustering v{clustering.version}: {k} clusters ({clustering.algorithm})",
            )
        )
    versions = session.execute(
        select(Adapter, AdapterVersion)
        .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
        .order_by(AdapterVersion.id.desc())
        .limit(limit)
    )
    for adapter, version in versions:
        events.append(
            Event(version.created_at, f"adapter {adapter.name} v{version.version} published")
        )
    events.sort(key=lambda event: event.at, reverse=True)
    return events[:limit]


@dataclass(frozen=True, slots=True)
class ClusterMap:
    """A clustering's devices and centroids projected on their first two principal axes."""

    version: int
    algorithm: str
    silhouette: float | None
    sizes: dict[int, int]
    points: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # label -> points
    centroids: list[dict[str, Any]] = field(default_factory=list)
    unassigned: list[dict[str, Any]] = field(default_factory=list)
    explained: tuple[float, float] = (0.0, 0.0)

    def chart_data(self) -> dict[str, Any]:
        return {
            "clusters": {str(label): pts for label, pts in sorted(self.points.items())},
            "centroids": self.centroids,
            "unassigned": self.unassigned,
        }


def pca_2d(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Mean and the first two principal axes of `rows` (padded with zeros below rank 2)."""
    mean = rows.mean(axis=0)
    _, singular, axes = np.linalg.svd(rows - mean, full_matrices=False)
    basis = np.zeros((2, rows.shape[1]))
    basis[: min(2, axes.shape[0])] = axes[:2]
    energy = singular**2
    total = float(energy.sum()) or 1.0
    share = [float(e / total) for e in energy[:2]] + [0.0, 0.0]
    return mean, basis, (share[0], share[1])


def cluster_map(*, session: Session) -> ClusterMap | None:
    """The newest clustering as a 2-D PCA map; None before the first clustering."""
    clustering = crud.latest_clustering(session=session)
    if clustering is None:
        return None
    clusters = list(session.scalars(select(Cluster).where(Cluster.clustering_id == clustering.id)))
    assigned = select(Assignment.client_id, Assignment.label).where(
        Assignment.clustering_id == clustering.id
    )
    labels = {client_id: label for client_id, label in session.execute(assigned)}
    try:  # what the clustering clustered: each enabled device's unit task direction
        ids, rows = clustering_crud.device_directions(session=session)
    except clustering_crud.MixedDimensionsError:  # the page says so when re-clustering fails
        ids, rows = [], np.zeros((0, 0))
    names = {client_id: name for client_id, name in session.execute(select(Client.id, Client.name))}
    silhouette = clustering.metrics.get("silhouette")
    result = ClusterMap(
        version=clustering.version,
        algorithm=clustering.algorithm,
        silhouette=None if silhouette is None else float(silhouette),
        sizes={c.label: c.size for c in sorted(clusters, key=lambda c: c.label)},
    )
    if not ids:
        return result
    mean, basis, explained = pca_2d(rows)
    projected = (rows - mean) @ basis.T
    for client_id, (x, y) in zip(ids, projected, strict=True):
        point = {"x": round(float(x), 5), "y": round(float(y), 5), "name": names.get(client_id, "")}
        label = labels.get(client_id)
        if label is None:
            result.unassigned.append(point)
        else:
            result.points.setdefault(label, []).append(point)
    for cluster in clusters:
        centroid = task_vector_from_bytes(cluster.centroid)
        if centroid.shape[0] == rows.shape[1]:
            x, y = (centroid - mean) @ basis.T
            result.centroids.append(
                {
                    "x": round(float(x), 5),
                    "y": round(float(y), 5),
                    "name": f"centroid {cluster.label}",
                }
            )
    return ClusterMap(
        version=result.version,
        algorithm=result.algorithm,
        silhouette=result.silhouette,
        sizes=result.sizes,
        points=result.points,
        centroids=result.centroids,
        unassigned=result.unassigned,
        explained=explained,
    )


@dataclass(frozen=True, slots=True)
class Reclustering:
    """A clustering version and how its labels carried over from the version before it."""

    clustering: Clustering
    previous: int | None  # the version before, None for the first
    kept: list[int]  # labels matched to a cluster of the previous version
    new: list[int]  # labels never used before
    retired: list[int]  # labels of the previous version that no cluster carries now
    stayed: int  # devices in both versions under the same label
    moved: int  # devices in both versions whose label changed
    joined: int  # devices assigned now but not in the previous version


def clustering_history(*, session: Session, limit: int = 10) -> list[Reclustering]:
    """The newest clusterings, newest first, each compared with the version before it."""
    clusterings = list(
        session.scalars(select(Clustering).order_by(Clustering.version.desc()).limit(limit + 1))
    )
    ids = [c.id for c in clusterings]
    labels: dict[int, set[int]] = {i: set() for i in ids}
    for clustering_id, label in session.execute(
        select(Cluster.clustering_id, Cluster.label).where(Cluster.clustering_id.in_(ids))
    ):
        labels[clustering_id].add(label)
    members: dict[int, dict[int, int]] = {i: {} for i in ids}
    for clustering_id, client_id, label in session.execute(
        select(Assignment.clustering_id, Assignment.client_id, Assignment.label).where(
            Assignment.clustering_id.in_(ids)
        )
    ):
        members[clustering_id][client_id] = label
    history = []
    for current, before in zip(clusterings[:limit], [*clusterings[1:], None], strict=False):
        now = labels[current.id]
        old = set() if before is None else labels[before.id]
        was = {} if before is None else members[before.id]
        common = [c for c in members[current.id] if c in was]
        stayed = sum(1 for c in common if members[current.id][c] == was[c])
        history.append(
            Reclustering(
                clustering=current,
                previous=None if before is None else before.version,
                kept=sorted(now & old),
                new=sorted(now - old),
                retired=sorted(old - now),
                stayed=stayed,
                moved=len(common) - stayed,
                joined=len(members[current.id]) - len(common),
            )
        )
    return history


def count_clusterings(*, session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Clustering)) or 0


@dataclass(frozen=True, slots=True)
class VersionRow:
    """One published adapter version and where it came from."""

    adapter: Adapter
    version: AdapterVersion
    round_number: int | None


def adapter_versions(*, session: Session, limit: int = 200) -> list[VersionRow]:
    """Every adapter version, newest first, with the number of the round that published it."""
    rows = session.execute(
        select(Adapter, AdapterVersion, Round.number)
        .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
        .outerjoin(Round, Round.id == AdapterVersion.round_id)
        .order_by(AdapterVersion.id.desc())
        .limit(limit)
    )
    return [VersionRow(adapter, version, number) for adapter, version, number in rows]


@dataclass(frozen=True, slots=True)
class RoundTimings:
    """How long a round collected and aggregated, and each cluster's share of the aggregation
    (seconds; None where the round has not reached that point)."""

    collecting_s: float | None
    aggregating_s: float | None
    clusters: list[tuple[int | None, float]]


def round_timings(round_: RoundOut) -> RoundTimings:
    closed, published = round_.closed_at, round_.published_at
    notes = (round_.report or {}).get("clusters", [])
    return RoundTimings(
        collecting_s=None if closed is None else (closed - round_.opened_at).total_seconds(),
        aggregating_s=None
        if closed is None or published is None
        else (published - closed).total_seconds(),
        clusters=[(n.get("label"), float(n["seconds"])) for n in notes if "seconds" in n],
    )
