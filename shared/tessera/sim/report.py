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


def cluster_table(report: SimReport) -> str:
    """Found clusters against the true styles of their members."""
    if report.ari is None:
        return "   no clustering: every device trained alone"
    lines = [f"   clusters found vs true styles (ARI {report.ari:.3f})"]
    lines.append(f"   {'cluster':>7}  {'size':>4}  true styles of its members")
    for cluster in report.clusters:
        styles = ", ".join(f"{s} x{n}" for s, n in sorted(cluster["true_styles"].items()))
        lines.append(f"   {cluster['label']:>7}  {cluster['size']:>4}  {styles}")
    return "\n".join(lines)


def comparison_table(reports: dict[str, SimReport]) -> str:
    """Per-round figures of every method side by side (markdown, readable in a terminal)."""
    lines = [
        "| method | round | held-out loss | style accuracy | content acc. | hybrid carries both "
        "| KB up / device | KB down / device | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, report in reports.items():
        for r in report.rounds:
            hybrid = "-" if r.hybrid is None else f"{r.hybrid['carries_both']:.2f}"
            lines.append(
                f"| {method} | {r.round} | {r.heldout_loss:.4f} | {r.style_accuracy:.2f} | "
                f"{r.content_accuracy:.2f} | {hybrid} | {r.bytes_up_per_device / 1024:.0f} | "
                f"{r.bytes_down_per_device / 1024:.0f} | {r.seconds:.0f} |"
            )
    return "\n".join(lines)


def plot_convergence(
    reports: dict[str, SimReport], png: Path, *, target: float | None = None
) -> None:
    """Held-out loss and style accuracy per round, one line per method (and the target)."""
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
    style_ax.set_ylim(0, 1.02)
    if target is not None:
        style_ax.axhline(target, color="grey", linestyle=":", linewidth=1)
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


def cluster_styles(report: SimReport) -> dict[str, str]:
    """Each found cluster's adapter name and the true style most of its members have."""
    return {
        f"cluster:{c['label']}": max(c["true_styles"].items(), key=lambda item: item[1])[0]
        for c in report.clusters
        if c["true_styles"]
    }


def generation_grid(
    base: BaseModel,
    adapters: dict[str, LoraAdapter],
    report: SimReport,
    png: Path,
    *,
    images: int = 16,
    shown: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Rows: base, each cluster's adapter, the equal hybrid of two clusters whose styles combine.

    Every row draws the same `images` prompts and noise; the first `shown` go in the PNG, and
    all are scored: each cluster row for its style, the hybrid row (and both of its parents)
    for carrying both styles' attributes.
    """
    from tessera.data import caption, cycled_subjects
    from tessera.data.evaluator import default_evaluator
    from tessera.lora.evidence import save_grid
    from tessera.model.generate import generate
    from tessera.model.latents import fit_images
    from tessera.sim.hybrid import HYBRID_WEIGHTS, hybrid_pair

    subjects = cycled_subjects(images, seed, "sim-grid")
    prompts = base.prompts.encode([caption(shape, colour) for shape, colour in subjects])
    styles = {name: style for name, style in cluster_styles(report).items() if name in adapters}
    rows: list[tuple[str, list[tuple[LoraAdapter, float]]]] = [("base", [])]
    rows += [(f"{name} ({style})", [(adapters[name], 1.0)]) for name, style in styles.items()]
    by_style = {style: name for name, style in styles.items()}
    pair = hybrid_pair(tuple(by_style))
    if pair is not None:
        a, b = (by_style[style] for style in pair)
        wa, wb = HYBRID_WEIGHTS
        mix = [(adapters[a], wa), (adapters[b], wb)]
        rows.append((f"{pair[0]} {wa:g} + {pair[1]} {wb:g}", mix))
    evaluator = default_evaluator()
    drawn: dict[str, torch.Tensor] = {}
    for label, mix in rows:
        result = generate(base, prompts, mix, steps=20, seed=seed).images
        assert result is not None
        drawn[label] = fit_images(result, evaluator.config.image_size)
    save_grid([rows_images[:shown] for rows_images in drawn.values()], list(drawn), png)
    scores: dict[str, Any] = {"labels": list(drawn), "style_accuracy": {}}
    for name, style in styles.items():
        label = f"{name} ({style})"
        scores["style_accuracy"][label] = evaluator.evaluate(drawn[label], style=style).style_share
    if pair is not None:
        hybrid = evaluator.hybrid(drawn[rows[-1][0]], pair).to_dict()
        hybrid["first_alone"] = evaluator.hybrid(drawn[f"{a} ({pair[0]})"], pair).carries_both
        hybrid["second_alone"] = evaluator.hybrid(drawn[f"{b} ({pair[1]})"], pair).carries_both
        scores["hybrid"], scores["hybrid_label"] = hybrid, rows[-1][0]
    return scores
