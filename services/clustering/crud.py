"""Database operations of the clustering service, as keyword-only functions over a session.

A device's task direction is the L2-normalised mean of *all* its TaskEmbedding rows: an upload
replaces a device's task description, so what is stored is its latest batch. Functions flush
and leave the commit to the caller.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import groupby

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from services.clustering import algorithms
from services.clustering.algorithms import (
    DEFAULT_LARGE_N,
    DEFAULT_SILHOUETTE_SAMPLE,
    ClusteringResult,
    Method,
    Vectors,
    as_matrix,
    check_vectors,
    cluster_vectors,
    match_clusters,
    mean_direction,
    normalise_rows,
    relabel,
)
from services.clustering.routing import assign_nearest, route
from tessera.federation import task_vector_bytes, task_vector_from_bytes
from tessera.models import Assignment, Client, Cluster, Clustering, Role, TaskEmbedding

DEFAULT_MIN_CLUSTER_SIZE = 2
DEFAULT_FAR_SIMILARITY = 0.5  # TESSERA_CLUSTER_DRIFT_SIMILARITY's default
ASSIGNMENT_BATCH = 5000  # assignment rows per INSERT
DIRECTION_BATCH = 5000  # task-vector rows fetched at a time when reclustering


class ClusteringStateError(Exception):
    """A request that the stored clients, vectors or clusterings cannot satisfy."""


class NothingToClusterError(ClusteringStateError):
    """No enabled device has task vectors."""


class UnknownClientError(ClusteringStateError):
    """No client has the id asked for."""


class NotADeviceError(ClusteringStateError):
    """Only enabled devices are clustered and assigned."""


class NoTaskVectorsError(ClusteringStateError):
    """The client has uploaded no task vectors."""


class NoClusteringError(ClusteringStateError):
    """No clustering yet, or the client has no assignment in the current one."""


class FirstClusteringTooLargeError(NoClusteringError):
    """No clustering yet, and too many devices to make the first one within a request."""


class MixedDimensionsError(ClusteringStateError):
    """Vectors of different widths (different encoders) cannot be compared."""


class ClusteringOptionsError(ClusteringStateError):
    """Options the algorithms refuse (contradictory, or impossible for the devices at hand)."""


def task_direction(vectors: Sequence[Vectors]) -> Vectors:
    """One unit direction for a device: the normalised mean of its normalised task vectors."""
    return mean_direction(normalise_rows(as_matrix(np.stack(vectors))))


def device_directions(*, session: Session) -> tuple[list[int], Vectors]:
    """Every enabled device with task vectors (ascending ids) and its task direction, one row
    each [n, d]. Rows stream in client order, DIRECTION_BATCH at a time, and each direction is
    written into one matrix sized by a count first: nothing else grows with the population."""
    capacity = count_devices_with_vectors(session=session)
    rows = session.execute(
        select(TaskEmbedding.client_id, TaskEmbedding.vector, TaskEmbedding.dim)
        .join(Client, Client.id == TaskEmbedding.client_id)
        .where(Client.role == Role.DEVICE, Client.disabled_at.is_(None))
        .order_by(TaskEmbedding.client_id, TaskEmbedding.id)
        .execution_options(yield_per=DIRECTION_BATCH)
    )
    client_ids: list[int] = []
    matrix: Vectors | None = None
    widths: dict[int, list[int]] = defaultdict(list)
    for client_id, group in groupby(rows, key=lambda row: int(row.client_id)):
        vectors = [task_vector_from_bytes(row.vector, dim=row.dim) for row in group]
        for width in {v.shape[0] for v in vectors}:
            widths[width].append(client_id)
        if len(widths) > 1:
            continue  # refused below, once every width is known
        if matrix is None:
            matrix = np.empty((max(capacity, 1), vectors[0].shape[0]))
        elif len(client_ids) == matrix.shape[0]:  # devices that uploaded since the count
            matrix = np.concatenate([matrix, np.empty_like(matrix)])
        matrix[len(client_ids)] = task_direction(vectors)
        client_ids.append(client_id)
    if len(widths) > 1:
        described = "; ".join(f"{w} for clients {ids[:5]}" for w, ids in sorted(widths.items()))
        raise MixedDimensionsError(
            f"task vectors have different dimensions ({described}): re-upload them with one encoder"
        )
    if matrix is None:
        return [], np.zeros((0, 0))
    return client_ids, matrix[: len(client_ids)]


def require_something_to_cluster(*, session: Session) -> None:
    """NothingToClusterError unless an enabled device has task vectors (one indexed lookup)."""
    found = session.scalar(
        select(TaskEmbedding.id)
        .join(Client, Client.id == TaskEmbedding.client_id)
        .where(Client.role == Role.DEVICE, Client.disabled_at.is_(None))
        .limit(1)
    )
    if found is None:
        raise NothingToClusterError(
            "no enabled device has uploaded task vectors: there is nothing to cluster"
        )


def count_devices_with_vectors(*, session: Session) -> int:
    """How many enabled devices have task vectors."""
    return (
        session.scalar(
            select(func.count(func.distinct(TaskEmbedding.client_id)))
            .join(Client, Client.id == TaskEmbedding.client_id)
            .where(Client.role == Role.DEVICE, Client.disabled_at.is_(None))
        )
        or 0
    )


def check_options(
    *, method: str, k: int | None, distance_threshold: float | None, min_cluster_size: int
) -> None:
    """ClusteringOptionsError for options that contradict each other, before any job runs."""
    try:
        algorithms.check_options(
            method=method,
            k=k,
            distance_threshold=distance_threshold,
            min_cluster_size=min_cluster_size,
        )
    except ValueError as error:
        raise ClusteringOptionsError(str(error)) from error


def client_direction(*, session: Session, client_id: int) -> Vectors | None:
    """One client's task direction, or None when it has no task vectors."""
    rows = session.execute(
        select(TaskEmbedding.vector, TaskEmbedding.dim)
        .where(TaskEmbedding.client_id == client_id)
        .order_by(TaskEmbedding.id)
    ).all()
    if not rows:
        return None
    vectors = [task_vector_from_bytes(row.vector, dim=row.dim) for row in rows]
    if len({v.shape[0] for v in vectors}) > 1:
        raise MixedDimensionsError("the client has task vectors of different dimensions")
    return task_direction(vectors)


def current_clustering(*, session: Session) -> Clustering | None:
    """The clustering with the highest version, or None before the first one."""
    return session.scalar(select(Clustering).order_by(Clustering.version.desc()).limit(1))


def require_current_clustering(*, session: Session) -> Clustering:
    """The current clustering; NoClusteringError before the first one."""
    clustering = current_clustering(session=session)
    if clustering is None:
        raise NoClusteringError(
            "no clustering yet: POST /v1/clusterings (or assign a device) to create the first"
        )
    return clustering


def clusters_of(*, session: Session, clustering: Clustering) -> list[Cluster]:
    """The clusters of one clustering, by label."""
    return list(
        session.scalars(
            select(Cluster).where(Cluster.clustering_id == clustering.id).order_by(Cluster.label)
        )
    )


def centroids_of(*, session: Session, clustering: Clustering) -> dict[int, Vectors]:
    """Label to centroid of one clustering."""
    return {
        cluster.label: task_vector_from_bytes(cluster.centroid)
        for cluster in clusters_of(session=session, clustering=clustering)
    }


def members_of(*, session: Session, clustering: Clustering) -> dict[int, list[int]]:
    """Label to the ids of the clients assigned to it in one clustering (ascending)."""
    members: dict[int, list[int]] = defaultdict(list)
    rows = session.execute(
        select(Assignment.label, Assignment.client_id)
        .where(Assignment.clustering_id == clustering.id)
        .order_by(Assignment.client_id)
    )
    for row in rows:
        members[row.label].append(row.client_id)
    return dict(members)


def assignment_in(*, session: Session, clustering: Clustering, client_id: int) -> Assignment | None:
    """A client's assignment in one clustering, if it has one."""
    return session.scalar(
        select(Assignment).where(
            Assignment.clustering_id == clustering.id, Assignment.client_id == client_id
        )
    )


def current_assignment(*, session: Session, client_id: int) -> tuple[Clustering, Assignment]:
    """A client's assignment in the current clustering; NoClusteringError where there is none."""
    clustering = require_current_clustering(session=session)
    assignment = assignment_in(session=session, clustering=clustering, client_id=client_id)
    if assignment is None:
        raise NoClusteringError(
            f"the client has no assignment in clustering version {clustering.version}"
        )
    return clustering, assignment


def recluster(
    *,
    session: Session,
    method: Method = "kmeans",
    k: int | None = None,
    seed: int = 0,
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE,
    distance_threshold: float | None = None,
    large_n: int = DEFAULT_LARGE_N,
    silhouette_sample: int = DEFAULT_SILHOUETTE_SAMPLE,
    far_similarity: float = DEFAULT_FAR_SIMILARITY,
) -> Clustering:
    """Cluster every enabled device's task direction into a new version under stable labels.

    Labels are carried over from the previous clustering by centroid matching; a new cluster
    gets a label never used before. With one device there is nothing to split: one cluster,
    whatever `k` asks. Above `large_n` devices, k-means runs on mini-batches (`cluster_vectors`).
    The metrics record the share of devices less similar than `far_similarity` to their
    centroid, from which the round loop measures drift.
    """
    client_ids, x = device_directions(session=session)
    if not client_ids:
        raise NothingToClusterError(
            "no enabled device has uploaded task vectors: there is nothing to cluster"
        )
    result = _cluster(
        x,
        method=method,
        k=k if k is None or len(client_ids) >= 2 else min(k, len(client_ids)),
        seed=seed,
        min_cluster_size=min_cluster_size,
        distance_threshold=distance_threshold,
        large_n=large_n,
        silhouette_sample=silhouette_sample,
    )
    previous = current_clustering(session=session)
    old = {} if previous is None else centroids_of(session=session, clustering=previous)
    if any(centroid.shape[0] != x.shape[1] for centroid in old.values()):
        old = {}  # another encoder: no label can be carried over
    used = session.scalar(select(func.max(Cluster.label)))
    fresh = 0 if used is None else used + 1  # a retired label is never handed out again
    stable = relabel(result, match_clusters(old, result.centroids, next_id=fresh))
    similarity = (x @ result.centroids.T)[np.arange(len(client_ids)), result.labels]  # [n, k]

    clustering = Clustering(
        version=(session.scalar(select(func.max(Clustering.version))) or 0) + 1,
        algorithm=method,
        params={
            "method": method,
            "k": k,
            "seed": seed,
            "min_cluster_size": min_cluster_size,
            "distance_threshold": distance_threshold,
        },
        metrics={
            "silhouette": result.silhouette,
            "sizes": {str(label): size for label, size in sorted(stable.sizes.items())},
            "k": result.k,
            "n_devices": len(client_ids),
            "noise": result.noise,
            "far_share": float(np.mean(similarity < far_similarity)),
        },
    )
    session.add(clustering)
    session.flush()
    for label in sorted(stable.centroids):
        session.add(
            Cluster(
                clustering_id=clustering.id,
                label=label,
                centroid=task_vector_bytes(stable.centroids[label]),
                size=stable.sizes[label],
            )
        )
    session.flush()
    now = datetime.now(UTC)
    for start in range(0, len(client_ids), ASSIGNMENT_BATCH):  # bulk: no ORM object per device
        rows = range(start, min(start + ASSIGNMENT_BATCH, len(client_ids)))
        session.execute(
            insert(Assignment),
            [
                {
                    "clustering_id": clustering.id,
                    "client_id": client_ids[row],
                    "label": int(stable.labels[row]),
                    "similarity": float(similarity[row]),
                    "created_at": now,
                }
                for row in rows
            ],
        )
    return clustering


def _cluster(
    x: Vectors,
    *,
    method: Method,
    k: int | None,
    seed: int,
    min_cluster_size: int,
    distance_threshold: float | None,
    large_n: int,
    silhouette_sample: int,
) -> ClusteringResult:
    """`cluster_vectors`, its refusals turned into ClusteringOptionsError."""
    try:
        return cluster_vectors(
            x,
            method=method,
            k=k,
            seed=seed,
            min_cluster_size=min_cluster_size,
            distance_threshold=distance_threshold,
            large_n=large_n,
            silhouette_sample=silhouette_sample,
        )
    except ValueError as error:
        raise ClusteringOptionsError(str(error)) from error


def assign_device(
    *, session: Session, client_id: int, large_n: int = DEFAULT_LARGE_N
) -> Assignment:
    """A device's assignment in the current clustering, made now if it uploaded since.

    A device with no assignment in the current clustering, or with task vectors newer than it,
    goes to its nearest current centroid (the cluster sizes follow); otherwise its assignment
    stands, so calling this twice changes nothing. Before any clustering, this runs the first
    one (k-means, k by silhouette) over every device with vectors, unless they are more than
    `large_n`: then FirstClusteringTooLargeError (the caller queues a job).
    """
    client = session.get(Client, client_id)
    if client is None:
        raise UnknownClientError("no such client")
    if client.role != Role.DEVICE:
        raise NotADeviceError(
            f"the client is a {client.role.value}: only devices are assigned to clusters"
        )
    if client.disabled:
        raise NotADeviceError("the client is disabled: only enabled devices are assigned")
    direction = client_direction(session=session, client_id=client_id)
    if direction is None:
        raise NoTaskVectorsError(
            "the client has uploaded no task vectors: upload them before assignment"
        )
    clustering = current_clustering(session=session)
    if clustering is None:
        devices = count_devices_with_vectors(session=session)
        if devices > large_n:
            raise FirstClusteringTooLargeError(
                f"no clustering yet, and {devices} devices are too many to cluster within a "
                f"request (TESSERA_CLUSTERING_LARGE_N={large_n})"
            )
        clustering = recluster(session=session, method="kmeans", large_n=large_n)
        return current_assignment(session=session, client_id=client_id)[1]

    existing = assignment_in(session=session, clustering=clustering, client_id=client_id)
    uploaded = session.scalar(
        select(func.max(TaskEmbedding.created_at)).where(TaskEmbedding.client_id == client_id)
    )
    if (
        existing is not None
        and uploaded is not None
        and _utc(uploaded) <= _utc(existing.created_at)
    ):
        return existing

    clusters = {c.label: c for c in clusters_of(session=session, clustering=clustering)}
    centroids = {label: task_vector_from_bytes(c.centroid) for label, c in clusters.items()}
    if any(centroid.shape[0] != direction.shape[0] for centroid in centroids.values()):
        raise MixedDimensionsError(
            f"the client's task vectors have {direction.shape[0]} dimensions, the "
            f"centroids of clustering version {clustering.version} another: recluster first"
        )
    label, similarity = assign_nearest(direction, centroids)
    if existing is None:
        existing = Assignment(clustering_id=clustering.id, client_id=client_id, label=label)
        session.add(existing)
    else:
        clusters[existing.label].size -= 1
    clusters[label].size += 1
    existing.label = label
    existing.similarity = similarity
    existing.created_at = datetime.now(UTC)
    session.flush()
    return existing


def _utc(moment: datetime) -> datetime:
    """An aware datetime; SQLite hands back naive ones, which are UTC here."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def route_vector(
    *, session: Session, vector: Sequence[float], temperature: float, top_k: int | None
) -> tuple[Clustering, list[tuple[int, float]]]:
    """The current clustering and a prompt vector's cluster weights, heaviest first.

    Raises ValueError, naming the problem, for a vector that is not finite, unit-norm and as
    wide as the centroids.
    """
    clustering = require_current_clustering(session=session)
    centroids = centroids_of(session=session, clustering=clustering)
    dim = next(iter(centroids.values())).shape[0]
    query = check_vectors(np.asarray([vector], dtype=np.float64), dim=dim)
    return clustering, route(query[0], centroids, temperature=temperature, top_k=top_k)
