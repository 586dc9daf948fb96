"""Showing what a simulation measured: tables, the convergence plot, a grid of generations."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import torch

from tessera.lora import LoraAdapter, adapter_from_bytes
from tessera.model.base import BaseModel
from tessera.sim.run import SimReport

GRID_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow star")


def cluster_table(report: SimReport) -> str:
    """Found clusters against the true styles of their members."""
    lines = [f"   clusters found vs true styles (ARI {report.ari:.3f})"]
    lines.append(f"   {'cluster':>7}  {'size':>4}  true styles of its members")
    for cluster in report.clusters:
        styles = ", ".join(f"{s} x{n}" for s, n in sorted(cluster["true_styles"].items()))
        lines.append(f"   {cluster['label']:>7}  {cluster['size']:>4}  {styles}")
    return "\n".join(lines)


def comparison_table(reports: dict[str, SimReport]) -> str:
    """Per-round figures of every method side by side (markdown, readable in a terminal)."""
    lines = [
        "| method | round | held-out loss | style accuracy | content acc. | KB up / device "
        "| KB down / device | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, report in reports.items():
        for r in report.rounds:
            lines.append(
                f"| {method} | {r.round} | {r.heldout_loss:.4f} | {r.style_accuracy:.2f} | "
                f"{r.content_accuracy:.2f} | {r.bytes_up_per_device / 1024:.0f} | "
                f"{r.bytes_down_per_device / 1024:.0f} | {r.seconds:.0f} |"
            )
    return "\n".join(lines)


def plot_convergence(reports: dict[str, SimReport], png: Path) -> None:
    """Held-out loss and style accuracy per round, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, style_ax) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for method, report in reports.items():
        rounds = [r.round for r in report.rounds]
        loss_ax.plot(rounds, [r.heldout_loss for r in report.rounds], marker="o", label=method)
        style_ax.plot(rounds, [r.style_accuracy for r in report.rounds], marker="o", label=method)
    loss_ax.set_title("held-out denoising loss (personal adapters)", fontsize=9)
    style_ax.set_title("style accuracy of device generations", fontsize=9)
    rounds = sorted({r.round for report in reports.values() for r in report.rounds})
    for ax in (loss_ax, style_ax):
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.legend(fontsize=8)
    style_ax.set_ylim(0, 1)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def published_adapters(
    aggregator_url: str, operator_token: str, base: BaseModel
) -> dict[str, LoraAdapter]:
    """The latest version of every published adapter, downloaded and checked."""
    headers = {"Authorization": f"Bearer {operator_token}"}
    adapters: dict[str, LoraAdapter] = {}
    with httpx.Client(base_url=aggregator_url, timeout=60) as http:
        listing = http.get("/v1/adapters", headers=headers)
        listing.raise_for_status()
        for entry in listing.json():
            if entry["latest"] is None:
                continue
            info = http.get(f"/v1/adapters/{entry['name']}/versions/latest", headers=headers)
            info.raise_for_status()
            body: dict[str, Any] = info.json()
            data = httpx.get(body["download_url"], timeout=60).content
            if hashlib.sha256(data).hexdigest() != body["sha256"]:
                raise RuntimeError(f"{entry['name']}: downloaded bytes do not match their sha256")
            adapters[entry["name"]] = adapter_from_bytes(data, base.lora_spec)
    return adapters


def generation_grid(
    base: BaseModel, adapters: dict[str, LoraAdapter], png: Path, seed: int = 0
) -> list[str]:
    """Rows: base, each cluster adapter, a 50/50 hybrid of the first two clusters; labels back."""
    from tessera.lora.evidence import save_grid
    from tessera.model.generate import generate

    prompts = base.prompts.encode(list(GRID_PROMPTS))
    clusters = sorted(name for name in adapters if name.startswith("cluster:"))
    rows: list[tuple[str, list[tuple[LoraAdapter, float]]]] = [("base", [])]
    rows += [(name, [(adapters[name], 1.0)]) for name in clusters]
    if len(clusters) >= 2:
        a, b = clusters[:2]
        rows.append((f"{a}+{b}", [(adapters[a], 0.5), (adapters[b], 0.5)]))
    images: list[torch.Tensor] = []
    for _, mix in rows:
        result = generate(base, prompts, mix, steps=20, seed=seed).images
        assert result is not None
        images.append(result)
    labels = [label for label, _ in rows]
    save_grid(images, labels, png)
    return labels
