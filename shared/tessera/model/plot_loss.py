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

    log_data = json.loads(log.read_text())
    runs = log_data.get("runs", [log_data])
    loss = [value for run in runs for value in run["loss"]]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(loss, color="0.75", linewidth=0.8, label="loss")
    ax.plot(moving_average(loss, window), color="C0", label=f"mean of {window}")
    boundary = 0
    for run in runs[:-1]:
        boundary += len(run["loss"])
        ax.axvline(boundary, color="C1", linestyle=":", label="continued (--init)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    minutes = sum(run["wall_seconds"] for run in runs) / 60
    ax.set_title(
        f"tiny-sd pretraining: batch {runs[-1]['batch_size']}, {len(loss)} steps, "
        f"{minutes:.1f} min on {runs[-1]['device']}",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    plot_loss(Path(sys.argv[1]), Path(sys.argv[2]))
