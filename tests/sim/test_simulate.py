"""The simulator and the demo, end to end on fresh stacks of embedded servers (slow; the
demo's run of tests/sim/conftest.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tessera.demo import run_console_demo, stop_console_demo, write_docs
from tessera.sim import SimConfig
from tessera.stack import console_url
from tests.helpers import metric_values
from tests.services.console.conftest import sign_in
from tests.sim.conftest import DemoRun

# The first test to run sets up the shared demo run (three federations): twice the usual limit;
# under pytest-xdist the tests sharing it run on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.xdist_group("demo")]


def test_a_cluster_aware_federation_runs_over_http(demo_run: DemoRun) -> None:
    report = demo_run.exact

    assert report.ari == pytest.approx(1.0)
    assert sorted(c["size"] for c in report.clusters) == [2, 2, 2]
    assert [r.round for r in report.rounds] == [1, 2, 3, 4]
    for number, row in enumerate(report.rounds, start=1):
        names = ["cluster:0", "cluster:1", "cluster:2", "global"]
        assert sorted(row.published) == [f"{name} v{number}" for name in names]
    first, second = report.rounds[:2]
    assert first.bytes_up_per_device > 100_000  # one fp16 rank-8 adapter each
    assert first.bytes_down_per_device < second.bytes_down_per_device  # round 2 downloads
    assert 0 <= second.style_accuracy <= 1 and second.heldout_loss > 0
    assert "ARI" in demo_run.printed
    # Aggregation runs in the worker's pool process; its main process serves what it recorded:
    # one observation per cluster aggregated, in each round.
    scraped = demo_run.scraped
    worker = metric_values(scraped["worker"])
    assert worker["tessera_aggregation_seconds_count"] == 3 * len(report.rounds)
    assert set(scraped) == {"worker", "inference-worker"}
    metric_values(scraped["inference-worker"])  # valid Prometheus text (jobs: test_hot_swap)


def test_demo_reports_every_method_and_the_hybrid(demo_run: DemoRun, tmp_path: Path) -> None:
    result, output = demo_run.result, demo_run.output

    report = json.loads((output / "report.json").read_text())
    assert report == json.loads(json.dumps(result))
    titles = {"cluster-aware (exact)", "global FedAvg", "local only"}
    assert set(report["methods"]) == set(report["headline"]) == titles
    for title in titles:
        rounds = report["methods"][title]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3, 4]
        assert all(0.0 <= r["style_accuracy"] <= 1.0 for r in rounds)
        headline = report["headline"][title]
        assert headline["final_style_accuracy"] == rounds[-1]["style_accuracy"]
        assert headline["rounds_to_target"] in (None, 1, 2, 3, 4)
    local = report["methods"]["local only"]
    assert all(r["bytes_up_per_device"] == 0 for r in local["rounds"])  # nothing leaves it
    assert local["ari"] is None and local["clusters"] == []  # no server, nothing clustered
    assert report["methods"]["cluster-aware (exact)"]["ari"] == pytest.approx(1.0)
    grid = report["grid"]
    assert grid["labels"][0] == "base" and len(grid["labels"]) == 5  # base, 3 clusters, hybrid
    assert 0.0 <= grid["hybrid"]["carries_both"] <= 1.0
    assert (output / "convergence.png").stat().st_size > 10_000
    assert (output / "generations.png").stat().st_size > 1_000
    assert "| local only | 4 |" in (output / "report.md").read_text()

    write_docs(result, output, tmp_path / "docs")

    page = (tmp_path / "docs" / "federation.md").read_text()
    ours = report["headline"]["cluster-aware (exact)"]
    assert f"| cluster-aware (exact) | {ours['rounds_to_target'] or 'not reached'} | " in page
    assert f"{ours['final_style_accuracy']:.2f} | {ours['final_heldout_loss']:.4f} |" in page
    assert f"{grid['hybrid']['carries_both']:.0%} of its" in page
    assert "- Against global FedAvg:" in page and "- Against local only:" in page
    assert (tmp_path / "docs" / "federation_generations.png").exists()


# `make console-demo`'s path with a smaller federation: the stack it leaves is what is checked.
CONSOLE_DEMO = SimConfig(
    devices=4, styles=2, rounds=2, steps=2, batch_size=2, samples=4, eval_images=1, eval_steps=2
)


def test_console_demo_leaves_a_stack_the_console_shows(tmp_path: Path) -> None:
    folder = str(tmp_path / "console-demo")
    info = run_console_demo(folder, config=CONSOLE_DEMO)
    try:
        with httpx.Client(base_url=info.urls["aggregator"], timeout=30) as http:
            signed_in = sign_in(http, info.operator_token)
            overview = http.get("/console/").text
            clusters = http.get("/console/clusters").text
            rounds = http.get("/console/rounds").text
            generate = http.get("/console/generate").text
    finally:
        stopped = stop_console_demo(folder)

    assert console_url(info.urls) == f"{info.urls['aggregator']}/console/"
    assert signed_in.status_code == 303
    assert '<span id="cluster-count">2</span> clusters' in clusters
    # Every device stays enabled, on the map in its cluster (a disabled one is left off it).
    assert "<dt>disabled</dt><dd>0</dd>" in overview
    chart = re.search(r'id="cluster-map-data">(.*?)</script>', clusters, flags=re.DOTALL)
    assert chart is not None
    mapped = json.loads(chart.group(1))["clusters"]
    assert sorted(len(points) for points in mapped.values()) == [2, 2]
    assert rounds.count('<span class="state published">published</span>') == CONSOLE_DEMO.rounds
    assert "encodes it on the server" in generate  # plaintext prompts allowed in the demo
    assert stopped and not stop_console_demo(folder)
