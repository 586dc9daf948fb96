"""Clustering of L2-normalised task vectors: pure functions over numpy arrays, no I/O.

Devices are clustered by cosine similarity; centroids are the L2-normalised mean of members,
so that every centroid lives on the unit sphere like the vectors it summarises. Up to `large_n`
vectors every method works on the exact pairwise distances; above it, k-means runs as
MiniBatchKMeans with the silhouette on a sample, so that nothing n x n is ever formed.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans, MiniBatchKMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

Method = Literal["agglomerative", "kmeans", "hdbscan"]
METHODS: tuple[Method, ...] = get_args(Method)
NORM_TOLERANCE = 1e-3
DEFAULT_LARGE_N = 5000  # TESSERA_CLUSTERING_LARGE_N's default
DEFAULT_SILHOUETTE_SAMPLE = 4000  # TESSERA_CLUSTERING_SILHOUETTE_SAMPLE's default
MINIBATCH_SIZE = 4096

Vectors = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ClusteringResult:
    """Clusters 0..k-1 of n vectors: labels [n], centroids [k, d], sizes and cosine silhouette."""

    labels: Labels
    centroids: Vectors
    sizes: tuple[int, ...]
    silhouette: float | None
    method: Method
    k: int
    noise: int = 0  # HDBSCAN noise points, each then given to its nearest centroid


@dataclass(frozen=True)
class StableClusters:
    """A clustering under stable ids: each vector's id, and per id its centroid and size."""

    labels: Labels
    centroids: dict[int, Vectors]
    sizes: dict[int, int]


def as_matrix(vectors: npt.ArrayLike) -> Vectors:
    """The vectors as a finite float64 [n, d] array, naming the first bad value otherwise."""
    try:
        array = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"vectors must be a rectangular array of numbers: {exc}") from exc
    if array.ndim != 2:
        raise ValueError(f"vectors must have shape [n, d], got shape {array.shape}")
    bad_rows, bad_cols = np.nonzero(~np.isfinite(array))
    if bad_rows.size:
        row, col = int(bad_rows[0]), int(bad_cols[0])
        raise ValueError(
            f"vector {row} has a non-finite value at position {col}: expected a finite number"
        )
    return array


def check_vectors(vectors: npt.ArrayLike, *, dim: int | None = None) -> Vectors:
    """The vectors as a float64 [n, d] array, refused unless finite, `dim` wide and unit-norm."""
    array = as_matrix(vectors)
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"vectors must have {dim} dimensions, found {array.shape[1]}")
    norms = np.linalg.norm(array, axis=1)
    off = np.nonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)[0]
    if off.size:
        row = int(off[0])
        raise ValueError(f"vector {row} is not L2-normalised: expected norm 1 ± {NORM_TOLERANCE}")
    return array


def normalise_rows(vectors: Vectors) -> Vectors:
    """Each row scaled to unit L2 norm; a zero row is refused, since it has no direction."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    zero = np.nonzero(norms[:, 0] < 1e-12)[0]
    if zero.size:
        raise ValueError(f"row {int(zero[0])} has zero norm and no direction to normalise")
    return np.asarray(vectors / norms, dtype=np.float64)


def cluster_vectors(
    vectors: npt.ArrayLike,
    *,
    method: Method,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    seed: int = 0,
    distance_threshold: float | None = None,
    min_cluster_size: int = 2,
    large_n: int = DEFAULT_LARGE_N,
    silhouette_sample: int = DEFAULT_SILHOUETTE_SAMPLE,
) -> ClusteringResult:
    """Clusters unit vectors by cosine similarity; k by best silhouette in `k_range` when None.

    `distance_threshold` (cosine distance, agglomerative only) cuts the tree instead of a k;
    `min_cluster_size` is HDBSCAN's, which finds its own k and takes neither. One cluster comes
    back where the vectors are all alike, or too few (n < 3) for a silhouette to choose k.
    Above `large_n` vectors only k-means is accepted, as `_cluster_large` runs it.
    """
    x = check_vectors(vectors)
    n = x.shape[0]
    _check_options(
        method=method,
        n=n,
        k=k,
        k_range=k_range,
        distance_threshold=distance_threshold,
        min_cluster_size=min_cluster_size,
    )
    if n > large_n:
        if method != "kmeans":
            raise ValueError(
                f"{method} needs every pairwise distance, too many for n={n} devices (above "
                f"TESSERA_CLUSTERING_LARGE_N={large_n}): use kmeans"
            )
        return _cluster_large(x, k=k, k_range=k_range, seed=seed, sample=silhouette_sample)
    distinct = len(np.unique(x, axis=0))
    if k is not None and k > distinct:
        raise ValueError(f"k={k} exceeds the {distinct} distinct vectors among the n={n} given")
    if n == 1 or k == 1 or distinct == 1:
        return _result(x, np.zeros(n, dtype=np.int64), method=method)
    if method == "hdbscan":
        return _hdbscan(x, min_cluster_size=min_cluster_size)
    distances = cosine_distances(x)
    if k is not None or distance_threshold is not None:
        labels = _fit(x, distances, method=method, k=k, threshold=distance_threshold, seed=seed)
        return _result(x, labels, method=method, distances=distances)
    low, high = k_range[0], min(k_range[1], n - 1, distinct)
    best: ClusteringResult | None = None
    for candidate in range(low, high + 1):
        labels = _fit(x, distances, method=method, k=candidate, threshold=None, seed=seed)
        result = _result(x, labels, method=method, distances=distances)
        if best is None or _score(result) > _score(best):
            best = result
    return best if best is not None else _result(x, np.zeros(n, dtype=np.int64), method=method)


def check_options(
    *, method: str, k: int | None, distance_threshold: float | None, min_cluster_size: int
) -> None:
    """Refuses options that contradict each other, whatever the vectors (before queueing)."""
    _check_options(
        method=method,
        n=sys.maxsize,
        k=k,
        k_range=(2, 8),
        distance_threshold=distance_threshold,
        min_cluster_size=min_cluster_size,
    )


def _check_options(
    *,
    method: str,
    n: int,
    k: int | None,
    k_range: tuple[int, int],
    distance_threshold: float | None,
    min_cluster_size: int,
) -> None:
    """Refuses contradictory or impossible options before any fitting."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if n == 0:
        raise ValueError("cannot cluster zero vectors: got an empty [0, d] array")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k is not None and k > n:
        raise ValueError(f"k={k} exceeds the number of vectors n={n}")
    if not 2 <= k_range[0] <= k_range[1]:
        raise ValueError(f"k_range must satisfy 2 <= low <= high, got {k_range}")
    if min_cluster_size < 2:
        raise ValueError(f"min_cluster_size must be at least 2, got {min_cluster_size}")
    if method == "hdbscan" and k is not None:
        raise ValueError(f"hdbscan chooses its own number of clusters; got k={k}")
    if distance_threshold is not None:
        if method != "agglomerative":
            raise ValueError(f"distance_threshold applies to agglomerative only, not {method}")
        if k is not None:
            raise ValueError(f"give k or distance_threshold, not both (k={k})")
        if not 0.0 < distance_threshold <= 2.0:
            raise ValueError(
                f"distance_threshold must be a cosine distance in (0, 2], got {distance_threshold}"
            )


def cosine_distances(x: Vectors) -> Vectors:
    """Pairwise cosine distances of unit rows, clipped to [0, 2] against rounding."""
    distances = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    return np.asarray(distances, dtype=np.float64)


def _fit(
    x: Vectors,
    distances: Vectors,
    *,
    method: Method,
    k: int | None,
    threshold: float | None,
    seed: int,
) -> Labels:
    """Raw labels from agglomerative (average linkage on cosine distance) or k-means."""
    if method == "kmeans":
        model = KMeans(n_clusters=k, n_init=10, random_state=seed)
        return np.asarray(model.fit_predict(x), dtype=np.int64)
    agglomerative = AgglomerativeClustering(
        n_clusters=k, distance_threshold=threshold, metric="precomputed", linkage="average"
    )
    return np.asarray(agglomerative.fit_predict(distances), dtype=np.int64)


def _hdbscan(x: Vectors, *, min_cluster_size: int) -> ClusteringResult:
    """HDBSCAN on cosine distance; noise points join their nearest cluster afterwards."""
    if x.shape[0] < min_cluster_size:
        return _result(x, np.zeros(x.shape[0], dtype=np.int64), method="hdbscan", noise=x.shape[0])
    model = HDBSCAN(min_cluster_size=min_cluster_size, metric="cosine", copy=True)
    labels = np.asarray(model.fit_predict(x), dtype=np.int64)
    noisy = labels < 0
    if noisy.all():
        return _result(x, np.zeros_like(labels), method="hdbscan", noise=int(noisy.sum()))
    if noisy.any():
        found = np.unique(labels[~noisy])
        centroids = np.stack([mean_direction(x[labels == c]) for c in found])
        labels[noisy] = found[np.argmax(x[noisy] @ centroids.T, axis=1)]
    return _result(x, labels, method="hdbscan", noise=int(noisy.sum()))


def mean_direction(members: Vectors) -> Vectors:
    """The L2-normalised mean of unit vectors; the first one where they cancel out exactly."""
    mean = members.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return np.asarray(members[0] if norm < 1e-12 else mean / norm, dtype=np.float64)


def _result(
    x: Vectors,
    raw_labels: Labels,
    *,
    method: Method,
    distances: Vectors | None = None,
    noise: int = 0,
    sample: int | None = None,
    seed: int = 0,
) -> ClusteringResult:
    """A result with clusters renumbered 0..k-1 in order of first appearance.

    The silhouette comes from `distances` (computed when None), or with `sample` from that many
    vectors drawn with `seed`, without any n x n matrix.
    """
    _, first, inverse = np.unique(raw_labels, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    labels = rank[inverse].astype(np.int64)
    k = int(order.size)
    centroids = _centroids(x, labels, k)
    silhouette = None
    if sample is not None:
        silhouette = _sampled_silhouette(x, labels, sample=sample, seed=seed)
    elif 2 <= k < x.shape[0]:
        d = cosine_distances(x) if distances is None else distances
        silhouette = float(silhouette_score(d, labels, metric="precomputed"))
    labels.flags.writeable = False
    centroids.flags.writeable = False
    return ClusteringResult(
        labels=labels,
        centroids=centroids,
        sizes=tuple(int(s) for s in np.bincount(labels, minlength=k)),
        silhouette=silhouette,
        method=method,
        k=k,
        noise=noise,
    )


def _cluster_large(
    x: Vectors, *, k: int | None, k_range: tuple[int, int], seed: int, sample: int
) -> ClusteringResult:
    """MiniBatchKMeans for each candidate k, chosen by the silhouette of a sample: O(n k d)."""
    if not np.ptp(x, axis=0).any():  # every vector alike: nothing to split
        return _result(x, np.zeros(x.shape[0], dtype=np.int64), method="kmeans")
    candidates = [k] if k is not None else range(k_range[0], k_range[1] + 1)
    best: ClusteringResult | None = None
    for candidate in candidates:
        model = MiniBatchKMeans(
            n_clusters=candidate, batch_size=MINIBATCH_SIZE, n_init=3, random_state=seed
        )
        labels = np.asarray(model.fit_predict(x), dtype=np.int64)
        result = _result(x, labels, method="kmeans", sample=sample, seed=seed)
        if best is None or _score(result) > _score(best):
            best = result
    assert best is not None  # k_range holds at least one k
    return best


def _centroids(x: Vectors, labels: Labels, k: int) -> Vectors:
    """Each cluster's `mean_direction`, summed through a sparse one-hot product (no row copies)."""
    n = x.shape[0]
    one_hot = csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(one_hot @ x, dtype=np.float64)
    norms = np.linalg.norm(sums, axis=1)
    cancelled = np.nonzero(norms < 1e-12 * np.bincount(labels, minlength=k))[0]
    for c in cancelled:  # members that cancel out exactly: the first one, as mean_direction
        sums[c], norms[c] = x[int(np.argmax(labels == c))], 1.0
    return np.asarray(sums / norms[:, np.newaxis], dtype=np.float64)


def _sampled_silhouette(x: Vectors, labels: Labels, *, sample: int, seed: int) -> float | None:
    """The cosine silhouette of `sample` vectors drawn with `seed`; None with one cluster."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(x.shape[0], size=min(sample, x.shape[0]), replace=False)
    if len(np.unique(labels[rows])) < 2:
        return None
    return float(silhouette_score(x[rows], labels[rows], metric="cosine"))


def _score(result: ClusteringResult) -> float:
    """The silhouette used to choose k, worst possible where undefined."""
    return -2.0 if result.silhouette is None else result.silhouette


def stack_centroids(
    centroids: Mapping[int, npt.ArrayLike], *, dim: int | None = None
) -> tuple[list[int], Vectors]:
    """Centroid ids in ascending order and their unit rows [k, d], refusing an empty mapping."""
    if not centroids:
        raise ValueError("no centroids given: at least one cluster is needed")
    ids = sorted(centroids)
    rows = [np.asarray(centroids[i], dtype=np.float64) for i in ids]
    shapes = {row.shape for row in rows}
    if len(shapes) != 1 or len(rows[0].shape) != 1:
        raise ValueError(f"centroids must all have one shape [d], found {sorted(shapes)}")
    if dim is not None and rows[0].shape[0] != dim:
        raise ValueError(f"centroids have {rows[0].shape[0]} dimensions, the vectors {dim}")
    matrix = np.stack(rows)
    if not np.isfinite(matrix).all():
        bad = ids[int(np.nonzero(~np.isfinite(matrix).all(axis=1))[0][0])]
        raise ValueError(f"centroid of cluster {bad} has non-finite values")
    return ids, normalise_rows(matrix)


def match_clusters(
    old_centroids: Mapping[int, npt.ArrayLike],
    new_centroids: npt.ArrayLike,
    *,
    next_id: int | None = None,
    min_similarity: float = 0.5,
) -> dict[int, int]:
    """Stable id for each new cluster index: its Hungarian match among old ids, else a fresh one.

    A pair matched below `min_similarity` (cosine) gets a fresh id too. Fresh ids count up from
    `next_id` (default: one past the largest old id); pass the largest id ever used plus one
    so that a retired id is never handed out again.
    """
    new = normalise_rows(as_matrix(new_centroids))
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be a cosine in [-1, 1], got {min_similarity}")
    mapping: dict[int, int] = {}
    if old_centroids:
        old_ids, old = stack_centroids(old_centroids, dim=new.shape[1])
        similarity = new @ old.T
        for row, col in zip(*linear_sum_assignment(similarity, maximize=True), strict=True):
            if similarity[row, col] >= min_similarity:
                mapping[int(row)] = old_ids[int(col)]
    floor = max(old_centroids, default=-1) + 1
    fresh = floor if next_id is None else next_id
    if fresh < floor:
        raise ValueError(f"next_id must be >= {floor} (past every old id), got {next_id}")
    for index in range(new.shape[0]):
        if index not in mapping:
            mapping[index] = fresh
            fresh += 1
    return dict(sorted(mapping.items()))


def relabel(result: ClusteringResult, mapping: Mapping[int, int]) -> StableClusters:
    """The result under stable ids, `mapping` taking each cluster index 0..k-1 to its id."""
    missing = sorted(set(range(result.k)) - set(mapping))
    if missing:
        raise ValueError(f"mapping lacks cluster indices {missing} of the k={result.k} found")
    ids = [mapping[index] for index in range(result.k)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"mapping gives two clusters one id: {ids}")
    lookup = np.asarray(ids, dtype=np.int64)
    labels = lookup[result.labels]
    labels.flags.writeable = False
    return StableClusters(
        labels=labels,
        centroids={ids[i]: result.centroids[i] for i in range(result.k)},
        sizes={ids[i]: result.sizes[i] for i in range(result.k)},
    )


def adjusted_rand_index(
    true: Sequence[Hashable] | npt.NDArray[Any], found: Sequence[Hashable] | npt.NDArray[Any]
) -> float:
    """Agreement of found clusters with ground truth (1 = same partition, ~0 = chance)."""
    if len(true) != len(found):
        raise ValueError(f"label lists differ in length: {len(true)} true, {len(found)} found")
    return float(adjusted_rand_score(np.asarray(true), np.asarray(found)))
