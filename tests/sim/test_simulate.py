"""The simulator and the demo, end to end on a fresh stack of embedded servers (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tessera.demo import run_demo, write_docs
from tessera.sim import SimConfig, SimReport
from tessera.sim.stack import run_on_fresh_stack
from tessera.stack import StackInfo
from tests.helpers import metric_values

pytestmark = pytest.mark.slow

TINY = SimConfig(
    devices=4,
    styles=2,
    rounds=2,
    steps=3,
    batch_size=2,
    samples=4,
    eval_images=2,
    eval_steps=3,
    workers=1,
)


def test_a_cluster_aware_federation_runs_over_http(tmp_path: Path) -> None:
    lines: list[str] = []
    scraped: dict[str, str] = {}

    def scrape_worker_metrics(info: StackInfo, _: SimReport) -> None:
        scraped.update({name: httpx.get(url).text for name, url in info.metrics.items()})

    report = run_on_fresh_stack(
        TINY, tmp_path / "stack", log=lines.append, after=scrape_worker_metrics
    )

    assert report.ari == pytest.approx(1.0)
    assert sorted(c["size"] for c in report.clusters) == [2, 2]
    assert [r.round for r in report.rounds] == [1, 2]
    first, second = report.rounds
    assert sorted(first.published) == ["cluster:0 v1", "cluster:1 v1", "global v1"]
    assert sorted(second.published) == ["cluster:0 v2", "cluster:1 v2", "global v2"]
    assert first.bytes_up_per_device > 100_000  # one fp16 rank-8 adapter each
    assert first.bytes_down_per_device < second.bytes_down_per_device  # round 2 downloads
    assert 0 <= second.style_accuracy <= 1 and second.heldout_loss > 0
    assert any("ARI" in line for line in lines)
    # Aggregation runs in the worker's pool process; its main process serves what it recorded:
    # one observation per cluster aggregated, in each round.
    worker = metric_values(scraped["worker"])
    assert worker["tessera_aggregation_seconds_count"] == 2 * len(report.rounds)
    assert set(scraped) == {"worker", "inference-worker"}
    metric_values(scraped["inference-worker"])  # valid Prometheus text (jobs: test_hot_swap)


def test_demo_reports_every_method_and_the_hybrid(tmp_path: Path) -> None:
    result = run_demo(str(tmp_path / "demo"), config=TINY)

    output = tmp_path / "demo" / "output"
    report = json.loads((output / "report.json").read_text())
    assert report == json.loads(json.dumps(result))
    titles = {"cluster-aware (exact)", "global FedAvg", "local only"}
    assert set(report["methods"]) == set(report["headline"]) == titles
    for title in titles:
        rounds = report["methods"][title]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(0.0 <= r["style_accuracy"] <= 1.0 for r in rounds)
        headline = report["headline"][title]
        assert headline["final_style_accuracy"] == rounds[-1]["style_accuracy"]
        assert headline["rounds_to_target"] in (None, 1, 2)
    local = report["methods"]["local only"]
    assert all(r["bytes_up_per_device"] == 0 for r in local["rounds"])  # nothing leaves it
    assert local["ari"] is None and local["clusters"] == []  # no server, nothing clustered
    assert report["methods"]["cluster-aware (exact)"]["ari"] == pytest.approx(1.0)
    grid = report["grid"]
    assert grid["labels"][0] == "base" and len(grid["labels"]) == 4  # base, 2 clusters, hybrid
    assert 0.0 <= grid["hybrid"]["carries_both"] <= 1.0
    assert (output / "convergence.png").stat().st_size > 10_000
    assert (output / "generations.png").stat().st_size > 1_000
    assert "| local only | 2 |" in (output / "report.md").read_text()

    write_docs(result, output, tmp_path / "docs")

    page = (tmp_path / "docs" / "federation.md").read_text()
    ours = report["headline"]["cluster-aware (exact)"]
    assert f"| cluster-aware (exact) | {ours['rounds_to_target'] or 'not reached'} | " in page
    assert f"{ours['final_style_accuracy']:.2f} | {ours['final_heldout_loss']:.4f} |" in page
    assert f"{grid['hybrid']['carries_both']:.0%} of its" in page
    assert "- Against global FedAvg:" in page and "- Against local only:" in page
    assert (tmp_path / "docs" / "federation_generations.png").exists()
