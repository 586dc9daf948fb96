"""The results runner's summary: means and spreads over seeds, rounds to target, the page."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tessera.sim.results import RESULTS_CONFIG, VARIANTS, run_file, summarise
from tessera.sim.results_page import markdown, plot


def fake_run(seed: int, accuracies: list[float], loss: float) -> dict:
    rounds = [
        {
            "round": i + 1,
            "heldout_loss": loss / (i + 1),
            "style_accuracy": accuracy,
            "hybrid": {"carries_both": accuracy / 2} if i else None,
            "bytes_up_per_device": 1024.0,
            "bytes_down_per_device": 2048.0 if i else 0.0,
        }
        for i, accuracy in enumerate(accuracies)
    ]
    return {"config": {"seed": seed}, "ari": 1.0, "rounds": rounds, "wall_seconds": 1.0}


def test_summary_averages_seeds_and_counts_rounds_to_the_target(tmp_path: Path) -> None:
    reports = {
        "cluster-aware exact": [fake_run(0, [0.5, 0.9], 0.2), fake_run(1, [0.7, 0.7], 0.4)],
        "global FedAvg": [fake_run(0, [0.5, 0.6], 0.3), fake_run(1, [0.5, 0.5], 0.3)],
    }

    summary = summarise(reports)

    ours = summary["cluster-aware exact"]
    assert ours["rounds_to_target"] == [2, None]
    assert ours["per_round"]["style_accuracy"]["mean"] == pytest.approx([0.6, 0.8])
    assert ours["per_round"]["style_accuracy"]["std"] == pytest.approx([0.1, 0.1])
    assert ours["per_round"]["hybrid"]["mean"][1] == pytest.approx(0.4)  # round 1 had none
    assert ours["final"]["heldout_loss"] == pytest.approx(0.15)
    assert summary["global FedAvg"]["rounds_to_target"] == [None, None]
    page = markdown(summary, RESULTS_CONFIG, [0, 1], "python -m tessera.sim.results")
    assert "Reproduce: `python -m tessera.sim.results`" in page
    assert "| cluster-aware exact | 2, - | 0.80 ± 0.10 |" in page
    plot(summary, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_every_method_the_issue_names_is_a_variant() -> None:
    methods = {(v["method"], v.get("lam")) for v in VARIANTS.values()}

    assert methods == {("exact", None), ("fedavg", None), ("global", None), ("local", None),
                       ("exact", 0.0)}  # fmt: skip
    assert RESULTS_CONFIG.devices == 24 and len(RESULTS_CONFIG.chosen_styles()) == 4
    assert RESULTS_CONFIG.rounds == 8


def test_a_saved_run_is_found_only_under_the_same_settings(tmp_path: Path) -> None:
    variant = replace(RESULTS_CONFIG, seed=1)

    same = run_file(tmp_path, "local only", replace(RESULTS_CONFIG, seed=1))
    other = run_file(tmp_path, "local only", replace(variant, lr=variant.lr / 2))

    assert same == run_file(tmp_path, "local only", variant)
    assert same.name.startswith("local_only-seed1-")
    assert other != same


def test_the_verdict_is_computed_from_the_runs() -> None:
    reports = {
        "cluster-aware exact": [fake_run(0, [0.5, 0.9], 0.2), fake_run(1, [0.6, 0.8], 0.2)],
        "global FedAvg": [fake_run(0, [0.5, 0.6], 0.3), fake_run(1, [0.5, 0.4], 0.3)],
        "local only": [fake_run(0, [0.6, 0.9], 0.3), fake_run(1, [0.4, 0.5], 0.3)],
    }

    page = markdown(summarise(reports), RESULTS_CONFIG, [0, 1], "cmd")

    assert "claim) holds for cluster-aware exact:** +0.20 mean style accuracy" in page
    assert "ahead in 2 of 2 seeds, +0.35 in the last round" in page
    assert "global FedAvg never reaches 80% within 2 rounds" in page
    assert "| local only | 0.60 ± 0.15 | +0.10 | 1 of 2 | +0.20 |" in page
    assert "**Against training alone**, cluster-aware exact is +0.10" in page
    assert "Not reaching 80% in any seed** within 2 rounds" in page


def test_a_claim_that_the_runs_contradict_is_called_so() -> None:
    reports = {
        "cluster-aware exact": [fake_run(0, [0.5, 0.6], 0.2), fake_run(1, [0.4, 0.5], 0.2)],
        "global FedAvg": [fake_run(0, [0.5, 0.9], 0.3), fake_run(1, [0.5, 0.8], 0.3)],
    }

    page = markdown(summarise(reports), RESULTS_CONFIG, [0, 1], "cmd")

    assert "claim) does not hold for cluster-aware exact" in page


def test_the_page_reports_clustering_cases_per_algorithm(tmp_path: Path) -> None:
    cases = tmp_path / "clustering_cases.json"
    rows = [
        {"case": "terse", "seed": s, "method": "kmeans", "k selection": "silhouette", "ari": a}
        for s, a in enumerate([0.5, 0.7])
    ]
    cases.write_text(json.dumps(rows))
    reports = {"global FedAvg": [fake_run(0, [0.5, 0.6], 0.3)]}

    page = markdown(summarise(reports), RESULTS_CONFIG, [0], "cmd", cases=cases)

    assert "| terse | kmeans | silhouette | 0.600 (0.500) |" in page


@pytest.mark.parametrize(
    ("without", "verdict"),
    [
        ([0.51, 0.91], "makes no clear difference here:** turning it off (lam 0) changes the "
         "mean accuracy by +0.01"),
        ([0.6, 0.96], "costs accuracy here:** with it off (lam 0) devices are +0.08"),
        ([0.4, 0.8], "helps here:** turning it off (lam 0) changes the mean accuracy by -0.10"),
    ],
)  # fmt: skip
def test_the_interaction_verdict_follows_the_lam_zero_runs(
    without: list[float], verdict: str
) -> None:
    reports = {
        "cluster-aware exact": [fake_run(0, [0.5, 0.9], 0.2)],
        "global FedAvg": [fake_run(0, [0.5, 0.6], 0.3)],
        "cluster-aware exact, lam 0": [fake_run(0, without, 0.2)],
    }

    page = markdown(summarise(reports), RESULTS_CONFIG, [0], "cmd")

    assert f"**Knowledge interaction {verdict}" in page


def test_a_page_of_one_seed_shows_no_spread_and_gives_no_verdict() -> None:
    reports = {
        "cluster-aware exact": [fake_run(0, [0.5, 0.9], 0.2)],
        "global FedAvg": [fake_run(0, [0.5, 0.6], 0.3)],
    }

    page = markdown(summarise(reports), RESULTS_CONFIG, [0], "cmd --seeds 0")

    assert "±" not in page
    assert "| cluster-aware exact | 2 | 0.90 | 0.1000 | 0.45 | 1.000 |" in page
    assert "claim) holds in one seed (no spread measured: not a verdict) for cluster-aware" in page
    assert "a share of 72 images, whose sampling error alone is up to 0.06" in page
    assert "## Per round (one seed)" in page
