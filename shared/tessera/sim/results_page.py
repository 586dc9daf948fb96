"""docs/RESULTS.md and results.png from a results summary: the tables, the verdict, the plot.

Every sentence of the verdict is computed from the summary (which method is ahead, in how many
seeds, by how much), so the page says what the runs measured and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tessera.sim.run import SimConfig

TARGET = 0.8
BASELINE = "global FedAvg"
OURS = "cluster-aware exact"
LOCAL = "local only"
NO_INTERACTION = "cluster-aware exact, lam 0"
CLEAR_MARGIN = 0.02  # a mean-accuracy lead below this is not called a lead


def _lead(summary: dict[str, Any], ours: str, theirs: str) -> dict[str, Any]:
    """How far `ours` is ahead of `theirs`: mean accuracy over the rounds, paired by seed."""
    mine, other = summary[ours]["mean_accuracy"], summary[theirs]["mean_accuracy"]
    paired = [a - b for a, b in zip(mine, other, strict=True)]
    final = summary[ours]["final"]["style_accuracy"] - summary[theirs]["final"]["style_accuracy"]
    return {
        "delta": float(np.mean(paired)),
        "ahead": sum(d > 0 for d in paired),
        "seeds": len(paired),
        "final_delta": float(final),
    }


def _pm(mean: float, std: float, digits: int, seeds: int) -> str:
    """`mean ± std` over seeds; the mean alone for one seed, which measures no spread."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def _judged(lead: dict[str, Any]) -> str:
    """'holds', 'does not hold' or 'is not clear', from a paired lead; one seed only
    suggests (a lead of one run is not read against any spread)."""
    if lead["seeds"] < 2:
        direction = "holds" if lead["delta"] >= CLEAR_MARGIN else "does not hold"
        return f"{direction} in one seed (no spread measured: not a verdict)"
    if lead["ahead"] == lead["seeds"] and lead["delta"] >= CLEAR_MARGIN:
        return "holds"
    if lead["ahead"] == 0 or lead["delta"] <= -CLEAR_MARGIN:
        return "does not hold"
    return "is not clear at this spread"


def _reached(row: dict[str, Any]) -> str:
    reached = [r for r in row["rounds_to_target"] if r is not None]
    if not reached:
        rounds = len(row["per_round"]["style_accuracy"]["mean"])
        return f"never reaches {TARGET:.0%} within {rounds} rounds"
    return (
        f"reaches {TARGET:.0%} in {len(reached)} of {len(row['rounds_to_target'])} seeds "
        f"(round {', '.join(map(str, reached))})"
    )


def verdict(summary: dict[str, Any], config: SimConfig) -> list[str]:
    """The paper's claim checked against the runs, and each method's standing."""
    if BASELINE not in summary:
        return []
    lines = ["## Verdict", ""]
    lines += [
        "Convergence speed is read as the mean style accuracy over all rounds (the area under "
        "the curve), paired by seed, and as the round at which the target is first reached.",
        "",
        "| method | mean accuracy over rounds | vs global FedAvg | seeds ahead | final vs "
        "global FedAvg | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        acc = row["mean_accuracy"]
        if name == BASELINE:
            versus = ahead = final = "-"
        else:
            lead = _lead(summary, name, BASELINE)
            versus = f"{lead['delta']:+.2f}"
            ahead = f"{lead['ahead']} of {lead['seeds']}"
            final = f"{lead['final_delta']:+.2f}"
        lines.append(
            f"| {name} | {_pm(np.mean(acc), np.std(acc), 2, len(acc))} | {versus} | {ahead} "
            f"| {final} "
            f"| {_reached(row)} |"
        )
    lines.append("")
    for ours in (OURS, NO_INTERACTION):
        if ours not in summary:
            continue
        lead = _lead(summary, ours, BASELINE)
        lines.append(
            f"- **Faster than FedAvg (the paper's claim) {_judged(lead)} for {ours}:** "
            f"{lead['delta']:+.2f} mean style accuracy over the rounds, ahead in "
            f"{lead['ahead']} of {lead['seeds']} seeds, {lead['final_delta']:+.2f} in the last "
            f"round; it {_reached(summary[ours])}, global FedAvg "
            f"{_reached(summary[BASELINE])}."
        )
    if OURS in summary and LOCAL in summary:
        lead = _lead(summary, OURS, LOCAL)
        lines.append(
            f"- **Against training alone**, {OURS} is {lead['delta']:+.2f} over the rounds "
            f"(ahead in {lead['ahead']} of {lead['seeds']} seeds) and {lead['final_delta']:+.2f} "
            "in the last round."
        )
    if OURS in summary and NO_INTERACTION in summary:
        lead = _lead(summary, NO_INTERACTION, OURS)
        if abs(lead["delta"]) < CLEAR_MARGIN:
            lines.append(
                f"- **Knowledge interaction makes no clear difference here:** turning it off "
                f"(lam 0) changes the mean accuracy by {lead['delta']:+.2f} ({lead['ahead']} of "
                f"{lead['seeds']} seeds ahead). A cluster takes from a neighbour in proportion "
                "to how close their task vectors are, itself included, and these styles' "
                "descriptions are far apart, so each takes a small part of lam."
            )
        elif lead["delta"] > 0:
            lines.append(
                f"- **Knowledge interaction costs accuracy here:** with it off (lam 0) devices "
                f"are {lead['delta']:+.2f} over the rounds ({lead['ahead']} of {lead['seeds']} "
                "seeds). Each cluster adapter absorbs a share of its neighbours', and what a "
                "neighbour teaches is another style."
            )
        else:
            lines.append(
                f"- **Knowledge interaction helps here:** turning it off (lam 0) changes the "
                f"mean accuracy by {lead['delta']:+.2f} ({lead['ahead']} of {lead['seeds']} "
                "seeds ahead)."
            )
    failed = [name for name, row in summary.items() if not any(row["rounds_to_target"])]
    rounds = len(next(iter(summary.values()))["per_round"]["style_accuracy"]["mean"])
    if failed:
        lines.append(
            f"- **Not reaching {TARGET:.0%} in any seed** within {rounds} rounds "
            f"({rounds * config.steps} training steps per device on {config.samples} "
            f"images): {', '.join(failed)}."
        )
    return [*lines, ""]


def clustering_section(cases: Path) -> list[str]:
    """ARI per population case, algorithm and k selection, from bench/clustering_cases.py."""
    if not cases.exists():
        return []
    rows = json.loads(cases.read_text())
    table: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        table.setdefault((row["case"], row["method"], row["k selection"]), []).append(row["ari"])
    lines = [
        "## Clustering from what devices really send",
        "",
        "The runs above cluster paraphrased, personalised descriptions (ARI in the headline). "
        "Harder populations: terse descriptions, descriptions that mention two styles, one "
        "style with 3x the devices, and all at once; 7 styles, seeds 0-2 "
        "(`python bench/clustering_cases.py --out docs`, details in "
        "[clustering_cases.md](clustering_cases.md)).",
        "",
        "| case | algorithm | k selection | ARI mean (min) |",
        "|---|---|---|---|",
    ]
    for (case, method, selection), aris in table.items():
        lines.append(f"| {case} | {method} | {selection} | {np.mean(aris):.3f} ({min(aris):.3f}) |")
    return [*lines, ""]


def markdown(
    summary: dict[str, Any],
    config: SimConfig,
    seeds: list[int],
    command: str,
    cases: Path | None = None,
) -> str:
    """docs/RESULTS.md: how it was made, the headline, the verdict, the per-round table."""
    n = len(seeds)
    scored = config.devices * config.eval_images  # images behind a round's style accuracy
    lines = [
        "# Results: does federating with similar devices pay?",
        "",
        f"Reproduce: `{command}`",
        "",
        f"{config.devices} devices over {len(config.chosen_styles())} styles "
        f"({', '.join(config.chosen_styles())}), {config.rounds} rounds, seeds "
        f"{', '.join(map(str, seeds))}. Each device owns {config.samples} images of its style "
        f"with its own tint, jitter and pattern geometry, and trains {config.steps} steps at "
        f"batch {config.batch_size} (lr {config.lr:g}, rank {config.rank}) per round, from the "
        "adapter it is served; the same budget, data and seeds in every method. Style accuracy: "
        f"the device's own generations ({config.eval_images} held-out prompts, "
        f"{config.eval_steps} DDIM steps) in its style. Hybrid: {config.hybrid_images} images of "
        "the equal hybrid (both at full strength) of the first two styles' adapters carrying "
        "both. Clustering runs once, before round 1, so ARI is one number per run."
        + (
            ""
            if n > 1
            else " One seed: one run per method, no spread measured; a round's style accuracy "
            f"is a share of {scored} images, whose sampling error alone is up to "
            f"{0.5 / np.sqrt(scored):.2f}."
        ),
        "",
        f"## Headline: rounds to {TARGET:.0%} style accuracy, and the last round",
        "",
        "| method | rounds to target (per seed) | final style accuracy | final held-out loss "
        "| final hybrid | ARI |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        reached = ", ".join("-" if r is None else str(r) for r in row["rounds_to_target"])
        f, sd = row["final"], row["final_std"]
        aris = [a for a in row["ari"] if a is not None]
        ari = f"{np.mean(aris):.3f}" if aris else "- (no clustering)"
        lines.append(
            f"| {name} | {reached} | {_pm(f['style_accuracy'], sd['style_accuracy'], 2, n)} | "
            f"{_pm(f['heldout_loss'], sd['heldout_loss'], 4, n)} | "
            f"{_pm(f['hybrid'], sd['hybrid'], 2, n)} | {ari} |"
        )
    lines += ["", "![results](results.png)", "", *verdict(summary, config)]
    if cases is not None:
        lines += clustering_section(cases)
    lines += [
        "## Per round (mean ± std over seeds)" if n > 1 else "## Per round (one seed)",
        "",
        "| method | round | style accuracy | held-out loss | hybrid | KB up / device "
        "| KB down / device |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        pr = row["per_round"]
        for i in range(len(pr["style_accuracy"]["mean"])):
            lines.append(
                f"| {name} | {i + 1} "
                f"| {_pm(pr['style_accuracy']['mean'][i], pr['style_accuracy']['std'][i], 2, n)} "
                f"| {_pm(pr['heldout_loss']['mean'][i], pr['heldout_loss']['std'][i], 4, n)} "
                f"| {_pm(pr['hybrid']['mean'][i], pr['hybrid']['std'][i], 2, n)} "
                f"| {pr['bytes_up_per_device']['mean'][i] / 1024:.0f} "
                f"| {pr['bytes_down_per_device']['mean'][i] / 1024:.0f} |"
            )
    lines += ["", "Raw numbers: [results.json](results.json).", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], png: Path) -> None:
    """Style accuracy, held-out loss and hybrid per round: mean over seeds, band of one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    for name, row in summary.items():
        for ax, metric in zip(axes, ("style_accuracy", "heldout_loss", "hybrid"), strict=True):
            mean = np.asarray(row["per_round"][metric]["mean"])
            std = np.asarray(row["per_round"][metric]["std"])
            x = np.arange(1, len(mean) + 1)
            ax.plot(x, mean, marker="o", markersize=3, label=name)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    axes[0].axhline(TARGET, color="grey", linestyle=":", linewidth=1)
    titles = ("style accuracy of device generations", "held-out denoising loss", "hybrid: both")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
    axes[0].set_ylim(0, 1.02)
    axes[2].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
