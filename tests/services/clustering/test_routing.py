"""Placing vectors among known clusters: nearest assignment and softmax routing weights."""

from __future__ import annotations

import numpy as np
import pytest

from services.clustering.routing import assign_nearest, route
from tests.services.clustering.synthetic import DIM, directions, scatter, unit

CENTRES = directions(4, seed=11)
CENTROIDS = {10 + i: CENTRES[i] for i in range(4)}


def test_assign_nearest_picks_the_cluster_of_a_single_vector():
    vectors, truth = scatter(CENTRES, [3, 3, 3, 3], seed=5)

    assigned = [assign_nearest(vector, CENTROIDS) for vector in vectors]

    assert [cluster for cluster, _ in assigned] == [10 + int(t) for t in truth]
    for vector, (cluster, similarity) in zip(vectors, assigned, strict=True):
        assert similarity == pytest.approx(float(vector @ CENTROIDS[cluster]))


def test_assign_nearest_uses_the_mean_of_a_devices_task_vectors():
    # Two of three task vectors lean to centre 2, one to centre 0: the mean is nearer centre 2.
    tasks = unit(np.stack([CENTRES[2] + 0.3 * CENTRES[0], CENTRES[2], CENTRES[0]]))

    cluster, similarity = assign_nearest(tasks, CENTROIDS)

    assert cluster == 12
    assert similarity == pytest.approx(float(unit(tasks.mean(axis=0)) @ CENTRES[2]))


@pytest.mark.parametrize(
    ("vectors", "centroids", "message"),
    [
        (CENTRES[0], {}, "no centroids given"),
        (unit(CENTRES[0][:8]), CENTROIDS, "centroids have 384 dimensions, the vectors 8"),
        (np.zeros((0, DIM)), CENTROIDS, "at least one task vector"),
        (2 * CENTRES[0], CENTROIDS, "vector 0 is not L2-normalised"),
        (CENTRES[0], {0: CENTRES[0], 1: CENTRES[1][:8]}, "one shape"),
    ],
)
def test_assign_nearest_refuses_bad_input(vectors, centroids, message):
    with pytest.raises(ValueError, match=message):
        assign_nearest(vectors, centroids)


def test_route_weights_sum_to_one_and_keep_the_top_k():
    prompt = unit(CENTRES[1] + 0.5 * CENTRES[3])

    weights = route(prompt, CENTROIDS, top_k=2)

    assert [cluster for cluster, _ in weights] == [11, 13]
    assert sum(weight for _, weight in weights) == pytest.approx(1.0)
    assert weights[0][1] > weights[1][1]


def test_route_is_a_softmax_of_cosine_over_temperature():
    a, b = np.eye(2, DIM)
    prompt = unit(np.array(a + 0.5 * b))

    weights = route(prompt, {0: a, 1: b}, temperature=0.5, top_k=None)

    logits = np.array([prompt @ a, prompt @ b]) / 0.5
    expected = np.exp(logits) / np.exp(logits).sum()
    assert weights == [(0, pytest.approx(expected[0])), (1, pytest.approx(expected[1]))]


def test_lower_temperature_sharpens_the_weights():
    prompt = unit(CENTRES[0] + 0.8 * CENTRES[2])

    top_weights = [route(prompt, CENTROIDS, temperature=t)[0][1] for t in (1.0, 0.1, 0.01)]

    assert top_weights[0] < top_weights[1] < top_weights[2]
    assert top_weights[2] > 0.99


def test_route_with_top_k_above_the_cluster_count_keeps_them_all():
    weights = route(CENTRES[0], CENTROIDS, top_k=10)

    assert sorted(cluster for cluster, _ in weights) == sorted(CENTROIDS)
    assert sum(weight for _, weight in weights) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"temperature": float("nan")}, "temperature must be > 0, got nan"),
        ({"top_k": 0}, "top_k must be at least 1"),
    ],
)
def test_route_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        route(CENTRES[0], CENTROIDS, **options)
