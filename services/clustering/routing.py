"""Placing a vector among known clusters: nearest-cluster assignment and soft routing weights."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from services.clustering.algorithms import Vectors, check_vectors, mean_direction, stack_centroids


def query_direction(vectors: npt.ArrayLike) -> Vectors:
    """One unit direction from a unit vector [d] or several [m, d] (their normalised mean)."""
    array = np.asarray(vectors, dtype=np.float64)
    if array.ndim == 1:
        array = array[np.newaxis, :]
    matrix = check_vectors(array)
    if matrix.shape[0] == 0:
        raise ValueError("no vectors given: a query needs at least one task vector")
    return mean_direction(matrix)


def similarities(
    vectors: npt.ArrayLike, centroids: Mapping[int, npt.ArrayLike]
) -> tuple[list[int], Vectors]:
    """Cluster ids in ascending order and the query's cosine similarity to each centroid."""
    query = query_direction(vectors)
    ids, matrix = stack_centroids(centroids, dim=query.shape[0])
    return ids, np.asarray(matrix @ query, dtype=np.float64)


def assign_nearest(
    vectors: npt.ArrayLike, centroids: Mapping[int, npt.ArrayLike]
) -> tuple[int, float]:
    """The id of the most similar centroid and its cosine similarity (lowest id on a tie)."""
    ids, sims = similarities(vectors, centroids)
    best = int(np.argmax(sims))
    return ids[best], float(sims[best])


def route(
    vector: npt.ArrayLike,
    centroids: Mapping[int, npt.ArrayLike],
    *,
    temperature: float = 0.1,
    top_k: int | None = 2,
) -> list[tuple[int, float]]:
    """Cluster weights for a prompt: softmax of cosine / temperature over the top-k, summing to 1.

    Pairs are sorted by weight, heaviest first (ties by id); `top_k=None` keeps every cluster.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for all clusters), got {top_k}")
    ids, sims = similarities(vector, centroids)
    logits = sims / temperature
    weights = np.exp(logits - logits.max())
    order = sorted(range(len(ids)), key=lambda i: (-weights[i], ids[i]))[:top_k]
    total = float(sum(weights[i] for i in order))
    return [(ids[i], float(weights[i]) / total) for i in order]
