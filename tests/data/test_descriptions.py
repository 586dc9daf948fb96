"""Task descriptions embedded with the real sentence encoder cluster by style (ARI >= 0.9)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import adjusted_rand_score

from tessera.data import DEVICE_STYLES, make_population
from tessera.data.descriptions import described_styles


def cluster(vectors: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Cluster labels from the two algorithms the clustering service offers first."""
    return {
        "agglomerative": AgglomerativeClustering(
            n_clusters=k, metric="cosine", linkage="average"
        ).fit_predict(vectors),
        "kmeans": KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(vectors),
    }


@pytest.mark.parametrize("population_seed", [0, 1])
def test_description_embeddings_recover_the_styles(sentence_encoder, population_seed):
    devices = make_population(4, seed=population_seed)
    texts = [text for device in devices for text in device.descriptions]
    styles = [device.style for device in devices for _ in device.descriptions]

    vectors = sentence_encoder(texts)
    labels = cluster(vectors, len(DEVICE_STYLES))

    for algorithm, predicted in labels.items():
        assert adjusted_rand_score(styles, predicted) >= 0.9, algorithm


def test_device_task_vectors_recover_the_styles(sentence_encoder):
    devices = make_population(4, seed=2)
    vectors = sentence_encoder([text for device in devices for text in device.descriptions])
    owners = np.repeat(np.arange(len(devices)), [len(d.descriptions) for d in devices])
    means = np.stack([vectors[owners == i].mean(axis=0) for i in range(len(devices))])
    device_vectors = means / np.linalg.norm(means, axis=1, keepdims=True)

    labels = cluster(device_vectors, len(DEVICE_STYLES))

    for algorithm, predicted in labels.items():
        assert adjusted_rand_score([d.style for d in devices], predicted) >= 0.9, algorithm


def test_every_style_has_descriptions():
    assert set(described_styles()) >= set(DEVICE_STYLES)
