"""Clustering of task vectors: recovery of known clusters, choice of k, stable ids, validation."""

from __future__ import annotations

import numpy as np
import pytest

from services.clustering import algorithms
from services.clustering.algorithms import (
    METHODS,
    adjusted_rand_index,
    check_vectors,
    cluster_vectors,
    match_clusters,
    relabel,
)
from tessera.data import DEVICE_STYLES, make_device
from tests.services.clustering.synthetic import DIM, blobs, directions, scatter, unit


@pytest.fixture(scope="module")
def encoded_devices() -> tuple[np.ndarray, list[str]]:
    """Task vectors of 16 simulated devices over 4 styles (mean of their encoded descriptions)."""
    from tessera.model.encoder import encode_tasks

    devices = [make_device(style, i) for style in DEVICE_STYLES[:4] for i in range(4)]
    vectors = encode_tasks([text for device in devices for text in device.descriptions]).numpy()
    owners = np.repeat(np.arange(len(devices)), [len(d.descriptions) for d in devices])
    means = np.stack([vectors[owners == i].mean(axis=0) for i in range(len(devices))])
    return unit(means), [device.style for device in devices]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_recovers_the_clusters(method):
    vectors, truth = blobs(5, seed=3)

    result = cluster_vectors(vectors, method=method)

    assert adjusted_rand_index(truth, result.labels) >= 0.95
    assert result.k == 5
    assert result.method == method
    assert sum(result.sizes) == len(vectors)
    assert result.silhouette is not None and result.silhouette > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_each_method_recovers_the_styles_of_encoded_descriptions(method, encoded_devices):
    vectors, styles = encoded_devices

    result = cluster_vectors(vectors, method=method)

    assert result.k == 4
    assert adjusted_rand_index(styles, result.labels) >= 0.9


@pytest.mark.parametrize("method", ["agglomerative", "kmeans"])
@pytest.mark.parametrize("true_k", [2, 3, 6])
def test_silhouette_chooses_the_true_k(method, true_k):
    vectors, _ = blobs(true_k, seed=true_k)

    result = cluster_vectors(vectors, method=method, k_range=(2, 8))

    assert result.k == true_k


def test_centroids_are_normalised_means_of_members():
    vectors, _ = blobs(3, seed=1)

    result = cluster_vectors(vectors, method="kmeans", k=3)

    for cluster in range(result.k):
        members = vectors[result.labels == cluster]
        np.testing.assert_allclose(result.centroids[cluster], unit(members.mean(axis=0)))
    assert result.sizes == tuple(np.bincount(result.labels))
    assert result.labels[0] == 0  # clusters are numbered in order of first appearance


def test_kmeans_is_deterministic_for_a_seed():
    vectors, _ = blobs(4, seed=5)

    first = cluster_vectors(vectors, method="kmeans", k_range=(2, 5), seed=7)
    second = cluster_vectors(vectors, method="kmeans", k_range=(2, 5), seed=7)

    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.centroids, second.centroids)


def test_distance_threshold_cuts_the_tree():
    vectors, truth = blobs(4, seed=2)

    result = cluster_vectors(vectors, method="agglomerative", distance_threshold=0.5)

    assert result.k == 4
    assert adjusted_rand_index(truth, result.labels) == 1.0


def test_hdbscan_gives_noise_points_to_their_nearest_cluster():
    vectors, truth = blobs(3, seed=4)
    random = unit(np.random.default_rng(9).normal(size=(3, DIM)))
    outliers = unit(random + 0.2 * directions(3, seed=4))  # each leans a little to one centre

    result = cluster_vectors(np.vstack([vectors, outliers]), method="hdbscan", min_cluster_size=3)

    assert (result.k, result.noise) == (3, 3)
    assert (result.labels >= 0).all()
    found = result.labels[: len(vectors)]
    assert adjusted_rand_index(truth, found) == 1.0
    found_of_centre = {int(t): int(f) for t, f in zip(truth, found, strict=True)}
    assert list(result.labels[-3:]) == [found_of_centre[i] for i in range(3)]


@pytest.mark.parametrize("method", METHODS)
def test_one_vector_is_one_cluster(method):
    vector = unit(np.ones((1, DIM)))

    result = cluster_vectors(vector, method=method)

    assert (result.k, result.sizes, result.silhouette) == (1, (1,), None)
    np.testing.assert_allclose(result.centroids, vector)


@pytest.mark.parametrize("method", METHODS)
def test_identical_vectors_are_one_cluster(method):
    vectors = unit(np.ones((6, DIM)))

    result = cluster_vectors(vectors, method=method)

    assert (result.k, result.sizes, result.silhouette) == (1, (6,), None)


def test_two_vectors_are_too_few_to_choose_k():
    vectors = np.eye(2, DIM)

    result = cluster_vectors(vectors, method="agglomerative")

    assert (result.k, result.silhouette) == (1, None)


def test_silhouette_is_none_when_every_vector_is_its_own_cluster():
    vectors, _ = blobs(3, seed=0, per_cluster=1)

    result = cluster_vectors(vectors[:3], method="agglomerative", k=3)

    assert result.k == 3
    assert result.silhouette is None


@pytest.mark.parametrize(
    ("vectors", "options", "message"),
    [
        (np.zeros((0, DIM)), {"method": "kmeans"}, "zero vectors"),
        (
            unit(np.eye(3, DIM)),
            {"method": "kmeans", "k": 4},
            "k=4 exceeds the number of vectors n=3",
        ),
        (unit(np.ones((3, DIM))), {"method": "kmeans", "k": 2}, "k=2 exceeds the 1 distinct"),
        (unit(np.eye(3, DIM)), {"method": "kmeans", "k": 0}, "k must be at least 1"),
        (unit(np.eye(3, DIM)), {"method": "hdbscan", "k": 2}, "hdbscan chooses its own"),
        (unit(np.eye(3, DIM)), {"method": "spectral"}, "unknown method 'spectral'"),
        (unit(np.eye(3, DIM)), {"method": "kmeans", "k_range": (1, 4)}, "2 <= low <= high"),
        (
            unit(np.eye(3, DIM)),
            {"method": "kmeans", "distance_threshold": 0.5},
            "agglomerative only, not kmeans",
        ),
        (
            unit(np.eye(3, DIM)),
            {"method": "agglomerative", "k": 2, "distance_threshold": 0.5},
            "not both",
        ),
        (unit(np.eye(3, DIM)), {"method": "hdbscan", "min_cluster_size": 1}, "at least 2, got 1"),
        (np.eye(3, DIM) * 2, {"method": "kmeans"}, "vector 0 is not L2-normalised"),
    ],
)
def test_impossible_requests_are_refused(vectors, options, message):
    with pytest.raises(ValueError, match=message):
        cluster_vectors(vectors, **options)


def test_stable_ids_survive_a_reclustering_of_shuffled_noisy_data():
    vectors, _ = blobs(4, seed=6)
    first = cluster_vectors(vectors, method="kmeans")
    old = relabel(first, match_clusters({}, first.centroids, next_id=10))
    order = np.random.default_rng(1).permutation(len(vectors))
    noise = np.random.default_rng(2).normal(scale=0.005, size=vectors.shape)
    jittered = unit(vectors[order] + noise)

    second = cluster_vectors(jittered, method="agglomerative")
    new = relabel(second, match_clusters(old.centroids, second.centroids))

    assert sorted(old.centroids) == [10, 11, 12, 13]
    np.testing.assert_array_equal(new.labels, old.labels[order])
    assert new.sizes == old.sizes


def test_a_new_cluster_gets_a_fresh_id_and_old_ones_keep_theirs():
    centres = directions(4, seed=8)
    before, _ = scatter(centres[:3], [6, 6, 6], seed=1)
    after, truth = scatter(centres, [6, 6, 6, 5], seed=2)
    first = cluster_vectors(before, method="kmeans", k=3)
    old = relabel(first, match_clusters({}, first.centroids))

    second = cluster_vectors(after, method="kmeans", k=4)
    new = relabel(second, match_clusters(old.centroids, second.centroids, next_id=7))

    old_id_of_centre = {int(np.argmax(centres[:3] @ c)): i for i, c in old.centroids.items()}
    expected = [old_id_of_centre.get(int(t), 7) for t in truth]
    assert list(new.labels) == expected


def test_a_match_below_min_similarity_gets_a_fresh_id():
    a, b, c = np.eye(3, DIM)
    old = {0: a, 4: b}

    mapping = match_clusters(old, np.stack([c, unit(a + 0.1 * b)]), min_similarity=0.5)

    assert mapping == {0: 5, 1: 0}


def test_more_old_clusters_than_new_retires_the_unmatched():
    a, b, c = np.eye(3, DIM)

    mapping = match_clusters({0: a, 1: b, 2: c}, np.stack([c, a]))

    assert mapping == {0: 2, 1: 0}


@pytest.mark.parametrize(
    ("old", "new", "options", "message"),
    [
        (
            {3: np.eye(2, DIM)[0]},
            np.eye(2, DIM),
            {"next_id": 2},
            r"next_id must be >= 4 \(past every old id\), got 2",
        ),
        ({0: np.eye(2, 8)[0]}, np.eye(2, DIM), {}, "centroids have 8 dimensions, the vectors 384"),
        ({}, np.eye(2, DIM), {"min_similarity": 1.5}, r"in \[-1, 1\], got 1.5"),
        ({}, np.zeros((1, DIM)), {}, "row 0 has zero norm"),
    ],
)
def test_match_clusters_refuses_bad_input(old, new, options, message):
    with pytest.raises(ValueError, match=message):
        match_clusters(old, new, **options)


def test_relabel_refuses_an_incomplete_or_colliding_mapping():
    result = cluster_vectors(blobs(3, seed=0)[0], method="kmeans", k=3)

    with pytest.raises(ValueError, match=r"lacks cluster indices \[2\] of the k=3"):
        relabel(result, {0: 5, 1: 6})
    with pytest.raises(ValueError, match="two clusters one id"):
        relabel(result, {0: 5, 1: 5, 2: 6})


def test_adjusted_rand_index_ignores_label_names():
    assert adjusted_rand_index(["dots", "dots", "night"], [7, 7, 2]) == 1.0
    with pytest.raises(ValueError, match="3 true, 2 found"):
        adjusted_rand_index([0, 0, 1], [0, 1])


def test_check_vectors_accepts_unit_rows():
    vectors = np.eye(2, DIM, dtype=np.float32)

    checked = check_vectors(vectors.tolist(), dim=DIM)

    assert checked.dtype == np.float64 and checked.shape == (2, DIM)


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.eye(2, 128), "must have 384 dimensions, found 128"),
        (np.eye(1, DIM)[0], r"shape \[n, d\], got shape \(384,\)"),
        ([[1.0, 0.0], [1.0]], "rectangular array"),
        (
            np.vstack([np.eye(2, DIM), np.full((1, DIM), np.nan)]),
            "vector 2 .* position 0: expected a finite number$",
        ),
        (
            np.vstack([np.eye(2, DIM), 0.9 * np.eye(1, DIM)]),
            "vector 2 is not L2-normalised: expected norm 1 ± 0.001$",
        ),
    ],
)
def test_check_vectors_names_the_fault(vectors, message):
    with pytest.raises(ValueError, match=message):
        check_vectors(vectors, dim=DIM)


def test_a_large_population_runs_minibatch_kmeans_without_any_pairwise_matrix(monkeypatch):
    vectors, truth = scatter(directions(4, seed=11), [700, 800, 750, 750], seed=12)

    def no_matrix(x):
        raise AssertionError(f"an n x n distance matrix was formed for n={x.shape[0]}")

    monkeypatch.setattr(algorithms, "cosine_distances", no_matrix)
    result = cluster_vectors(vectors, method="kmeans", large_n=1000, silhouette_sample=500, seed=0)

    assert result.k == 4  # chosen by the sampled silhouette among k = 2..8
    assert adjusted_rand_index(truth, result.labels) > 0.99
    assert sorted(result.sizes) == [700, 750, 750, 800]
    assert result.silhouette is not None and result.silhouette > 0.5
    assert np.allclose(np.linalg.norm(result.centroids, axis=1), 1.0)
    for c in range(result.k):  # centroids are still the normalised means of the members
        mean = vectors[result.labels == c].mean(axis=0)
        assert np.allclose(result.centroids[c], mean / np.linalg.norm(mean))


def test_a_large_population_follows_a_given_k_and_the_small_path_agrees():
    vectors, truth = scatter(directions(3, seed=21), [400, 400, 400], seed=22)

    large = cluster_vectors(vectors, method="kmeans", k=3, large_n=100, silhouette_sample=300)
    small = cluster_vectors(vectors, method="kmeans", k=3, large_n=10_000)

    assert large.k == small.k == 3
    assert adjusted_rand_index(large.labels, small.labels) == 1.0
    assert adjusted_rand_index(truth, large.labels) == 1.0


@pytest.mark.parametrize("method", ["agglomerative", "hdbscan"])
def test_methods_that_need_every_distance_are_refused_above_large_n(method):
    vectors, _ = blobs(3, per_cluster=10)

    with pytest.raises(ValueError, match=f"{method} needs every pairwise distance.*n=3"):
        cluster_vectors(vectors, method=method, large_n=20)
