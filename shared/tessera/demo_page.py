"""docs/federation.md from a demo's report: what `tessera demo --docs docs` writes.

Every number on the page comes from the run's report.json; the reading at the end compares
the methods with the same numbers, so the page cannot say more than the run measured.
"""

from __future__ import annotations

from typing import Any

CLUSTER_AWARE = "cluster-aware (exact)"
GLOBAL = "global FedAvg"
LOCAL = "local only"


def _reached(round_: int | None) -> str:
    return "no round" if round_ is None else f"round {round_}"


def federation_page(result: dict[str, Any], *, target: float, command: str) -> str:
    """The demo's page: set-up, headline, per-round table, plot, grid and a reading."""
    from tessera.sim.report import comparison_table
    from tessera.sim.run import SimReport

    config, headline, grid = result["config"], result["headline"], result["grid"]
    reports = {title: SimReport(**data) for title, data in result["methods"].items()}
    _fix_rounds(reports)
    minutes, seconds = divmod(round(result["seconds"]), 60)
    ours = reports[CLUSTER_AWARE]
    clusters = "; ".join(
        f"cluster {c['label']}: " + ", ".join(f"{s} x{n}" for s, n in c["true_styles"].items())
        for c in ours.clusters
    )
    lines = [
        "# Federation: what `make demo` measured",
        "",
        f"Command: `{command}`. Wall time of this run: {minutes} min {seconds:02d} s inside the "
        "command, on this machine's 2 cores.",
        "",
        "The demo simulates one federation three times with the same devices, seeds and budget "
        "per device: cluster-aware with exact aggregation (Tessera's default) and one global "
        "adapter by plain FedAvg (what generic FL frameworks give), each on a fresh stack of "
        "embedded servers (Valkey, SeaweedFS, SQLite), and every device alone (no server). "
        f"{config['devices']} virtual devices over {len(config['style_names'])} styles "
        f"({', '.join(config['style_names'])}), {config['rounds']} rounds. Every device owns "
        f"{config['samples']} images of its style, rendered with its own hue shift, jitter and "
        "pattern geometry, the same images every round; each round it trains "
        f"{config['steps']} steps at batch {config['batch_size']} (lr {config['lr']:g}, rank "
        f"{config['rank']}) from the adapter it is served (its cluster's, the global one, or "
        "its own), uploads it over HTTP, and is scored on held-out prompts of its own "
        "distribution: denoising loss of its personal adapter, and the style the evaluator "
        f"finds in {config['eval_images']} of its own generations ({config['eval_steps']} DDIM "
        "steps).",
        "",
        f"Clusters found from the devices' task descriptions: ARI {ours.ari:.3f} ({clusters}).",
        "",
        f"## Rounds to {target:.0%} style accuracy, and the last round",
        "",
        "| method | round that reaches it | final style accuracy | final held-out loss |",
        "|---|---|---|---|",
    ]
    for title, row in headline.items():
        lines.append(
            f"| {title} | {row['rounds_to_target'] or 'not reached'} | "
            f"{row['final_style_accuracy']:.2f} | {row['final_heldout_loss']:.4f} |"
        )
    lines += ["", "## Per round", "", comparison_table(reports), ""]
    lines += ["![convergence](federation_convergence.png)", ""]
    lines += _grid_section(grid)
    lines += ["## Reading", "", *_reading(headline, reports), ""]
    return "\n".join(lines)


def _fix_rounds(reports: dict[str, Any]) -> None:
    """Rounds read back from JSON are dicts; the tables want RoundReport objects."""
    from tessera.sim.run import RoundReport

    for report in reports.values():
        report.rounds = [RoundReport(**r) if isinstance(r, dict) else r for r in report.rounds]


def _grid_section(grid: dict[str, Any]) -> list[str]:
    lines = [
        "## The published cluster adapters, and a hybrid",
        "",
        "Rows: " + ", ".join(grid.get("labels", [])) + ". The same prompts and noise in every "
        "row (20 DDIM steps).",
    ]
    accuracies = grid.get("style_accuracy", {})
    if accuracies:
        lines.append(
            "Style accuracy of each cluster row: "
            + ", ".join(f"{label} {value:.2f}" for label, value in accuracies.items())
            + "."
        )
    hybrid = grid.get("hybrid")
    if hybrid:
        a, b = hybrid["styles"]
        lines.append(
            f"The hybrid row ({grid['hybrid_label']}): {hybrid['carries_both']:.0%} of its "
            f"{hybrid['n_images']} images carry both {a}'s and {b}'s attributes ({a}'s alone: "
            f"{hybrid['carries_first']:.0%}, {b}'s alone: {hybrid['carries_second']:.0%}); "
            f"the {a} cluster's own adapter carries both in {hybrid['first_alone']:.0%}, the "
            f"{b} cluster's in {hybrid['second_alone']:.0%}."
        )
    return [*lines, "", "![generations](federation_generations.png)", ""]


def _reading(headline: dict[str, Any], reports: dict[str, Any]) -> list[str]:
    """Comparisons stated from the numbers: who reaches the target first, and by how much
    the final loss and style accuracy differ."""
    ours, theirs = headline[CLUSTER_AWARE], headline[GLOBAL]
    lines = []
    firsts = {report.rounds[0].heldout_loss for report in reports.values()}
    if len(firsts) == 1:
        lines.append(
            "- Round 1 is the same for every method (same held-out loss): every device trains "
            "its own images from scratch with the same seed before anything is shared."
        )

    def versus(other_title: str, other: dict[str, Any]) -> str:
        loss = 1.0 - ours["final_heldout_loss"] / other["final_heldout_loss"]
        gap = ours["final_style_accuracy"] - other["final_style_accuracy"]
        return (
            f"- Against {other_title}: the target is reached in "
            f"{_reached(ours['rounds_to_target'])} by cluster-aware, in "
            f"{_reached(other['rounds_to_target'])} by {other_title}; final style accuracy "
            f"{ours['final_style_accuracy']:.2f} against {other['final_style_accuracy']:.2f} "
            f"({gap:+.2f}); final held-out loss {abs(loss):.0%} "
            f"{'lower' if loss >= 0 else 'higher'}."
        )

    lines.append(versus(GLOBAL, theirs))
    if LOCAL in headline:
        lines.append(versus(LOCAL, headline[LOCAL]))
    local = reports.get(LOCAL)
    if local is not None:
        lines.append(
            f"- Each device sends one fp16 adapter "
            f"({reports[CLUSTER_AWARE].rounds[0].bytes_up_per_device / 1024:.0f} KB) per round "
            "and, from round 2, downloads one; local devices send nothing."
        )
    return lines
