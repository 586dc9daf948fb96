"""Clustering from what devices really send: ARI per population case, algorithm and k selection.

    python bench/clustering_cases.py --out docs

Each device's task vector is the mean direction of its descriptions' MiniLM vectors, as the
clustering service computes it. Populations (7 device styles, seeds 0-2):

- paraphrased: every device writes 3-5 personalised paraphrases of its style (the simulator's);
- terse: half the devices write only 1-3 words ("stripy pls");
- two styles: a third of the devices also mention another style in one description;
- unbalanced: one style has 3x the devices of the others;
- all at once: terse, two styles and unbalanced together.

Each population is clustered by k-means, agglomerative (average linkage) and HDBSCAN on cosine
distance, with k chosen by silhouette (2..10) or given (the true number of styles; HDBSCAN
chooses its own). Writes docs/clustering_cases.md and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

from services.clustering.algorithms import METHODS, cluster_vectors, mean_direction
from tessera.data import DEVICE_STYLES, make_device, rng_for
from tessera.data.descriptions import mentioning, terse_descriptions
from tessera.model.encoder import encode_tasks

PER_STYLE = 4
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Case:
    """How a population departs from the paraphrased one."""

    name: str
    terse_share: float = 0.0
    two_style_share: float = 0.0
    heavy_style_factor: int = 1


CASES = (
    Case("paraphrased"),
    Case("terse", terse_share=0.5),
    Case("two styles", two_style_share=1 / 3),
    Case("unbalanced (one style 3x)", heavy_style_factor=3),
    Case("all at once", terse_share=0.5, two_style_share=1 / 3, heavy_style_factor=3),
)


def population(case: Case, seed: int) -> tuple[list[str], list[tuple[str, ...]]]:
    """True styles and each device's descriptions for one case and seed."""
    rng = rng_for("clustering-cases", case.name, seed)
    styles, texts = [], []
    for s, style in enumerate(DEVICE_STYLES):
        count = PER_STYLE * (case.heavy_style_factor if s == 0 else 1)
        for index in range(count):
            descriptions = make_device(style, index, seed).descriptions
            if rng.random() < case.terse_share:
                descriptions = terse_descriptions(style, int(rng.integers(1, 4)), rng)
            if rng.random() < case.two_style_share:
                others = [o for o in DEVICE_STYLES if o != style]
                descriptions = mentioning(descriptions, others[int(rng.integers(len(others)))], rng)
            styles.append(style)
            texts.append(descriptions)
    return styles, texts


def device_vectors(texts: list[tuple[str, ...]]) -> np.ndarray:
    """One unit task vector per device: the mean direction of its descriptions' vectors."""
    flat = [t for device in texts for t in device]
    encoded = encode_tasks(flat).numpy().astype(np.float64)
    vectors, start = [], 0
    for device in texts:
        vectors.append(mean_direction(encoded[start : start + len(device)]))
        start += len(device)
    return np.stack(vectors)


def measure(seeds: tuple[int, ...]) -> list[dict[str, object]]:
    """ARI and k found for every case x algorithm x k selection, per seed."""
    rows: list[dict[str, object]] = []
    for case in CASES:
        for seed in seeds:
            styles, texts = population(case, seed)
            vectors = device_vectors(texts)
            for method in METHODS:
                for selection in ("silhouette", "known k"):
                    if method == "hdbscan" and selection == "known k":
                        continue
                    k = len(DEVICE_STYLES) if selection == "known k" else None
                    found = cluster_vectors(vectors, method=method, k=k, k_range=(2, 10), seed=seed)
                    rows.append(
                        {
                            "case": case.name,
                            "seed": seed,
                            "devices": len(styles),
                            "method": method,
                            "k selection": "own" if method == "hdbscan" else selection,
                            "k": len(set(found.labels.tolist())),
                            "ari": float(adjusted_rand_score(styles, found.labels)),
                        }
                    )
    return rows


def markdown(rows: list[dict[str, object]], seconds: float, command: str) -> str:
    """The table: mean ARI (min over seeds) and the k found, per case and algorithm."""
    lines = [
        "# Clustering from what devices really send",
        "",
        f"Reproduce: `{command}` ({seconds:.0f} s on this machine). "
        f"{len(DEVICE_STYLES)} device styles, {PER_STYLE} devices each (12 for the heavy "
        f"style where unbalanced), seeds {', '.join(map(str, SEEDS))}; task vectors from "
        "MiniLM, the mean direction of each device's descriptions. Cases are described in "
        "`bench/clustering_cases.py`.",
        "",
        "| case | algorithm | k selection | ARI mean (min) | k found (true 7) |",
        "|---|---|---|---|---|",
    ]
    keys = sorted(
        {(str(r["case"]), str(r["method"]), str(r["k selection"])) for r in rows},
        key=lambda key: ([c.name for c in CASES].index(key[0]), key[1], key[2]),
    )
    for case, method, selection in keys:
        mine = [
            r
            for r in rows
            if (r["case"], r["method"], r["k selection"]) == (case, method, selection)
        ]
        aris = [float(r["ari"]) for r in mine]  # type: ignore[arg-type]
        ks = ", ".join(str(r["k"]) for r in mine)
        lines.append(
            f"| {case} | {method} | {selection} | {np.mean(aris):.3f} ({min(aris):.3f}) | {ks} |"
        )
    lines += ["", "Raw numbers: [clustering_cases.json](clustering_cases.json).", ""]
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    started = time.perf_counter()
    rows = measure(SEEDS)
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clustering_cases.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = markdown(rows, seconds, "python bench/clustering_cases.py --out docs")
    (args.out / "clustering_cases.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
