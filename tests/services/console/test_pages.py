"""The console's pages over a real database: empty states, API refusals shown, the cluster map."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.aggregator.crud import replace_task_vectors
from services.clustering.crud import recluster
from services.clustering.main import create_app as create_clustering_app
from services.console.app import STATIC_DIR
from tessera.config import Settings
from tessera.lora import adapter_to_bytes, random_adapter
from tessera.model.facts import load_facts
from tessera.models import AdapterKind, ClusteringJob, Round, RoundState
from tessera.storage import ObjectStore
from tests.helpers import enrol, on_redis_db
from tests.services.aggregator.factories import publish
from tests.services.clustering.helpers import run_here
from tests.services.console.conftest import CONSOLE_QUEUE_DB, sign_in, signed_in_csrf
from tests.services.console.factories import federation

# The pages that show state (Generate is a form; its job pages are polled until they end).
LIVE_PAGES = (
    "/console/",
    "/console/rounds",
    "/console/clusters",
    "/console/adapters",
    "/console/gallery",
)


def _chart(page: str) -> dict[str, Any]:
    """The cluster map's data in the Clusters page."""
    found = re.search(r'<script type="application/json" id="cluster-map-data">(.*?)</script>', page)
    assert found is not None
    chart: dict[str, Any] = json.loads(found.group(1))
    return chart


def _signed_in(aggregator: TestClient, operator_token: str) -> str:
    assert sign_in(aggregator, operator_token).status_code == 303
    return signed_in_csrf(aggregator)


def test_empty_platform_says_what_to_do_next(aggregator: TestClient, operator_token: str) -> None:
    _signed_in(aggregator, operator_token)

    overview = aggregator.get("/console/").text
    rounds = aggregator.get("/console/rounds").text
    clusters = aggregator.get("/console/clusters").text
    adapters = aggregator.get("/console/adapters").text
    generate = aggregator.get("/console/generate").text
    gallery = aggregator.get("/console/gallery").text

    assert "No round yet:" in overview and 'href="/console/rounds">open one' in overview
    assert "No device enrolled yet" in overview
    assert "No clustering yet" in overview
    services = aggregator.get("/console/services", headers={"HX-Request": "true"}).text
    assert [name for name in ("aggregator", "clustering", "inference") if name in services] == [
        "aggregator",
        "clustering",
        "inference",
    ]
    # Whether a Celery worker answers depends on the run (a shared Redis has other tests'
    # workers); the peers are never served here, so they show as down with the reason.
    assert services.count("unreachable (ConnectError)") == 2
    assert "No round yet: open one above." in rounds
    assert "No clustering yet" in clusters
    assert "No adapter published yet: a round publishes one per cluster" in adapters
    assert "No adapter published yet: the base model alone" in generate
    assert "No adapter published yet: once a round publishes its adapters" in gallery


def test_every_page_refreshes_itself(aggregator: TestClient, operator_token: str) -> None:
    """Each page's content polls its own URL (htmx), so that no page needs a manual reload."""
    _signed_in(aggregator, operator_token)
    for path in LIVE_PAGES:
        live = re.search(r'<div id="live" ([^>]*)>', aggregator.get(path).text)

        assert live is not None, path
        assert f'hx-get="{path}"' in live.group(1), path
        assert 'hx-trigger="every ' in live.group(1), path


def test_open_close_cancel_show_the_apis_refusals(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    csrf = _signed_in(aggregator, operator_token)

    bad = aggregator.post("/console/rounds", data={"csrf": csrf, "rank": "65"})
    opened = aggregator.post(
        "/console/rounds",
        data={
            "csrf": csrf,
            "method": "fedavg",
            "min_updates": "3",
            "deadline_s": "600",
            "lam": "0",
            "robust": "krum",
            "robust_f": "1",
        },
    )
    twice = aggregator.post("/console/rounds", data={"csrf": csrf})
    round_id = session.scalars(select(Round.id)).one()
    close = aggregator.post(f"/console/rounds/{round_id}/close", data={"csrf": csrf})
    cancel = aggregator.post(f"/console/rounds/{round_id}/cancel", data={"csrf": csrf})
    again = aggregator.post(f"/console/rounds/{round_id}/cancel", data={"csrf": csrf})

    assert bad.status_code == 422 and "rank: Input should be less than or equal to 64" in bad.text
    assert opened.status_code == 200 and "fedavg, cluster, rank 8, λ 0.0, krum" in opened.text
    assert "data-deadline=" in opened.text
    assert twice.status_code == 409
    assert "a round is already collecting" in twice.text or "close or cancel it" in twice.text
    assert close.status_code == 409
    assert "round 1 has no updates to aggregate; cancel it instead" in close.text
    assert cancel.status_code == 200 and "cancelled by bootstrap-operator" in cancel.text
    assert again.status_code == 409 and "round 1 is cancelled, not collecting" in again.text
    session.expire_all()
    assert session.get(Round, round_id).state == RoundState.CANCELLED  # type: ignore[union-attr]


def test_cluster_map_has_every_device_and_cluster(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    federation(aggregator, operator_token, session, groups=3, per_group=4)
    _signed_in(aggregator, operator_token)

    page = aggregator.get("/console/clusters").text
    chart = _chart(page)

    assert sorted(len(points) for points in chart["clusters"].values()) == [4, 4, 4]
    assert len(chart["centroids"]) == 3 and chart["unassigned"] == []
    assert '<span id="cluster-count">3</span> clusters' in page
    # Devices of one cluster sit together on the map: each cluster's spread is small.
    for points in chart["clusters"].values():
        xs = [p["x"] for p in points]
        assert max(xs) - min(xs) < 0.5
    overview = aggregator.get("/console/").text
    assert "<strong>3</strong> clusters" in overview and "edge-2-3" in overview


@pytest.fixture
def clustering_service(aggregator: TestClient, settings: Settings) -> Iterator[TestClient]:
    """The real clustering app in-process, as the console's (the aggregator's) clustering client;
    its re-clustering jobs wait on a Redis database that no worker reads (a test runs them)."""
    with TestClient(create_clustering_app(on_redis_db(settings, CONSOLE_QUEUE_DB))) as client:
        aggregator.app.state.clustering_http = client  # type: ignore[attr-defined]
        yield client


def test_the_map_shows_each_devices_direction_as_clustered(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    """A device that sent several task vectors is drawn at its task direction (the normalised
    mean of its normalised vectors), which is what the clustering clusters, not at their mean."""
    axes = np.eye(6)
    devices = [
        (group, enrol(aggregator, operator_token, f"edge-{group}-{member}"))
        for group in range(3)
        for member in range(2)
    ]
    for group, device in devices:  # 3 (e_g + e_(g+3)) and e_g - e_(g+3): direction e_g
        vectors = [3 * (axes[group] + axes[group + 3]), axes[group] - axes[group + 3]]
        replace_task_vectors(
            session=session,
            client_id=device["id"],
            encoder_id="test-encoder",
            vectors=[vector.tolist() for vector in vectors],
        )
    recluster(session=session, method="kmeans", k=3)
    session.commit()
    _signed_in(aggregator, operator_token)

    chart = _chart(aggregator.get("/console/clusters").text)

    centroids = {c["name"].removeprefix("centroid "): (c["x"], c["y"]) for c in chart["centroids"]}
    for label, points in chart["clusters"].items():  # each device on its centroid, e_g
        assert all(math.dist((p["x"], p["y"]), centroids[label]) < 1e-3 for p in points)


def test_recluster_from_the_console(
    aggregator: TestClient,
    clustering_service: TestClient,
    operator_token: str,
    session: Session,
    settings: Settings,
) -> None:
    csrf = _signed_in(aggregator, operator_token)
    nothing = aggregator.post("/console/clusters", data={"csrf": csrf, "method": "kmeans"})
    federation(aggregator, operator_token, session, groups=2, per_group=3)
    contradictory = aggregator.post(
        "/console/clusters", data={"csrf": csrf, "method": "hdbscan", "k": "2"}
    )
    queued = aggregator.post("/console/clusters", data={"csrf": csrf, "method": "kmeans", "k": "2"})
    job = session.scalars(select(ClusteringJob)).one()
    run_here(settings, job.id)  # what the worker does with the job
    done = aggregator.get("/console/clusters")
    refused = aggregator.post(
        "/console/clusters", data={"csrf": csrf, "method": "kmeans", "k": "9"}
    )
    run_here(
        settings,
        session.scalars(select(ClusteringJob.id).order_by(ClusteringJob.id.desc())).first(),
    )
    failed = aggregator.get("/console/clusters")

    assert nothing.status_code == 409
    assert "no enabled device has uploaded task vectors" in nothing.text
    assert contradictory.status_code in (409, 422) and 'role="alert"' in contradictory.text
    assert queued.status_code == 200
    assert re.search(r'<td class="job-state">queued</td>', queued.text)
    assert done.status_code == 200
    assert re.search(r'<td class="job-state">succeeded</td>', done.text)
    assert refused.status_code == 200
    assert re.search(r'<td class="job-state">failed</td>\s*<td>k=9 exceeds the number', failed.text)
    history = done.text.split('id="history-table"')[1]
    versions = re.findall(r"<tr><td>(\d+)</td><td>\d{4}-", history)
    assert versions == ["2", "1"]
    # The same devices clustered again: both labels carried over, every device kept its own.
    assert "from v1: kept 0, 1</td>" in done.text and "6 stayed, 0 moved</td>" in done.text
    assert "first clustering: labels 0, 1" in done.text


def test_assets_are_vendored_and_served(aggregator: TestClient) -> None:
    for name in ("vendor/htmx-2.0.4.min.js", "vendor/chart-4.6.1.umd.min.js", "console.js"):
        response = aggregator.get(f"/console/static/{name}")
        assert response.status_code == 200, name
        assert response.content == (STATIC_DIR / name).read_bytes()
    page = aggregator.get("/console/signin").text
    assert "https://" not in page and "http://" not in page


def test_adapters_list_versions_with_lineage_and_download_them(
    aggregator: TestClient, operator_token: str, session: Session, store: ObjectStore
) -> None:
    csrf = _signed_in(aggregator, operator_token)
    assert "No adapter published yet" in aggregator.get("/console/adapters").text
    aggregator.post("/console/rounds", data={"csrf": csrf})
    round_ = session.scalars(select(Round)).one()
    data = b"not a real adapter, only bytes the store keeps"
    version = publish(session, store, "cluster:0", data, kind=AdapterKind.CLUSTER, cluster_label=0)
    version.round_id = round_.id
    version.metrics = {"updates": 5, "energy_kept": 0.99}
    session.commit()

    page = aggregator.get("/console/adapters").text
    row = re.search(r"<tr>\s*<td>cluster:0</td>(.*?)</tr>", page, re.S)
    download = aggregator.get(f"/console/adapters/{version.id}/download")
    missing = aggregator.get("/console/adapters/999999/download")
    aggregator.cookies.clear()
    anonymous = aggregator.get(f"/console/adapters/{version.id}/download", follow_redirects=False)

    assert row is not None
    cells = re.findall(r"<td>(.*?)</td>", row.group(1), re.S)
    assert cells[:5] == ["cluster", "v1", str(round_.number), "5", "4"]
    assert download.status_code == 200 and download.content == data
    assert 'filename="cluster-0-v1.safetensors"' in download.headers["content-disposition"]
    assert missing.status_code == 404
    assert anonymous.status_code == 303


def test_a_rounds_timings_and_report_are_shown(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    csrf = _signed_in(aggregator, operator_token)
    aggregator.post("/console/rounds", data={"csrf": csrf})
    round_ = session.scalars(select(Round)).one()
    round_.state = RoundState.PUBLISHED
    round_.closed_at = round_.opened_at + timedelta(seconds=12)
    round_.published_at = round_.closed_at + timedelta(seconds=3.5)
    below = "below quorum: 0 usable of 1 updates < 1"
    round_.report = {
        "clusters": [
            {"label": 0, "updates": 2, "used": 2, "clipped": 1, "energy_kept": 0.981,
             "seconds": 0.25, "published": True, "reason": None},
            {"label": 1, "updates": 1, "used": 0, "samples": 0, "published": False,
             "reason": below},
        ],
        "withheld": [],
    }  # fmt: skip
    session.commit()

    page = aggregator.get("/console/rounds").text
    timings = re.search(r'<td class="timings">(.*?)</td>', page, re.S)

    assert timings is not None
    assert [" ".join(t.split()) for t in re.findall(r"<div>(.*?)</div>", timings.group(1))] == [
        "collected 12.0 s",
        "aggregated and published 3.5 s",
        "cluster 0: 0.25 s",
    ]
    assert "<td>98.1%</td>" in page and f"no: {html.escape(below)}" in page


def test_an_adapter_exports_to_diffusers_and_kohya(
    aggregator: TestClient,
    operator_token: str,
    session: Session,
    store: ObjectStore,
    settings: Settings,
) -> None:
    spec = load_facts(settings.base_model).lora_spec()
    data = adapter_to_bytes(random_adapter(spec, 4, 4.0, seed=0))
    version = publish(session, store, "global", data, kind=AdapterKind.GLOBAL)
    _signed_in(aggregator, operator_token)

    page = aggregator.get("/console/adapters").text
    diffusers = aggregator.get(f"/console/adapters/{version.id}/export/diffusers")
    kohya = aggregator.get(f"/console/adapters/{version.id}/export/kohya")
    unknown = aggregator.get(f"/console/adapters/{version.id}/export/onnx")

    assert f'href="/console/adapters/{version.id}/export/kohya"' in page
    assert 'filename="global-v1.diffusers.safetensors"' in diffusers.headers["content-disposition"]
    assert {key.split(".")[0] for key in load(diffusers.content)} == {"unet"}
    assert all(key.startswith("lora_unet_") for key in load(kohya.content))
    assert unknown.status_code == 404 and "diffusers, kohya" in unknown.text


def test_a_private_round_is_opened_and_its_privacy_shown(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    csrf = _signed_in(aggregator, operator_token)
    private = {"method": "exact", "weighting": "equal", "clip": "fixed", "robust": "none"}

    unbounded = aggregator.post(
        "/console/rounds", data={"csrf": csrf, **private, "noise_multiplier": "1.5"}
    )
    opened = aggregator.post(
        "/console/rounds",
        data={"csrf": csrf, **private, "clip_norm": "2", "noise_multiplier": "1.5"},
        follow_redirects=False,
    )
    page = aggregator.get("/console/rounds").text

    assert unbounded.status_code == 422 and "clip_norm is required" in unbounded.text
    assert opened.status_code == 303
    round_ = session.scalars(select(Round)).one()
    assert round_.config["noise_multiplier"] == 1.5 and round_.config["clip_norm"] == 2.0
    assert "Private: noise multiplier 1.5, clip 2.0; largest ε 0.00" in page
