"""Task descriptions embedded with the real sentence encoder cluster by style (ARI >= 0.9)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import adjusted_rand_score

from tessera.data import DEVICE_STYLES, make_population
from tessera.data.descriptions import described_styles, mentioning, terse_descriptions


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


def test_terse_descriptions_are_a_few_words_of_the_style():
    rng = np.random.default_rng(0)

    words = terse_descriptions("stripes", 3, rng)

    assert len(set(words)) == 3
    assert all(1 <= len(text.split()) <= 3 for text in words)
    with pytest.raises(ValueError, match=r"count must be in 1\.\.4"):
        terse_descriptions("stripes", 5, rng)


def test_mentioning_adds_a_second_style_to_exactly_one_description():
    rng = np.random.default_rng(1)
    own = ("striped shapes", "bold diagonal stripes")

    mixed = mentioning(own, "dots", rng)

    changed = [new for old, new in zip(own, mixed, strict=True) if new != old]
    assert len(changed) == 1
    assert any(word in changed[0] for word in ("dots", "polka", "spotty"))
    with pytest.raises(ValueError, match="unknown style 'cubist'"):
        mentioning(own, "cubist", rng)
