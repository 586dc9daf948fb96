"""Plot a pretraining loss log (JSON from `tessera.model.pretrain`) to a PNG.

python -m tessera.model.plot_loss LOG.json docs/pretraining_loss.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` steps (shorter at the start)."""
    array = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(array, 0, 0.0))
    idx = np.arange(1, len(array) + 1)
    lo = np.maximum(0, idx - window)
    return (sums[idx] - sums[lo]) / (idx - lo)


def plot_loss(log: Path, png: Path, window: int = 25) -> None:
    """Raw and smoothed loss against step, with the run's device and wall time in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads(log.read_text())
    loss = run["loss"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(loss, color="0.75", linewidth=0.8, label="loss")
    ax.plot(moving_average(loss, window), color="C0", label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_title(
        f"tiny-sd pretraining: batch {run['batch_size']}, {run['steps']} steps, "
        f"{run['wall_seconds'] / 60:.1f} min on {run['device']}"
    )
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    plot_loss(Path(sys.argv[1]), Path(sys.argv[2]))
