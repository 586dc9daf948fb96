"""Synthetic task vectors: K unit directions in 384 dimensions, members scattered around each."""

from __future__ import annotations

import numpy as np

DIM = 384


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def directions(k: int, *, seed: int, shared: float = 0.6) -> np.ndarray:
    """K unit directions that share a common component (cosine about shared**2), like MiniLM's."""
    rng = np.random.default_rng(seed)
    common = unit(rng.normal(size=DIM))
    own = unit(rng.normal(size=(k, DIM)))
    return unit(shared * common + np.sqrt(1 - shared**2) * own)


def scatter(
    centres: np.ndarray, sizes: list[int], *, seed: int, noise: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    """Unit members around each centre (cosine about 0.86), shuffled; returns vectors, truth."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    vectors = unit(centres[truth] + rng.normal(scale=noise, size=(truth.size, DIM)))
    order = rng.permutation(truth.size)
    return vectors[order], truth[order]


def blobs(k: int, *, seed: int = 0, per_cluster: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """K clusters of slightly unequal sizes around fresh directions; returns vectors, truth."""
    sizes = [per_cluster + (i % 3) for i in range(k)]
    return scatter(directions(k, seed=seed), sizes, seed=seed + 1)
