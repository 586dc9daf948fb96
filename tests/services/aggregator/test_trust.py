"""Bounded influence through the HTTP API: scale range at upload, round settings, exclusions."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator

import httpx
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from services.worker.rounds import aggregate_round_now
from tessera import cli
from tessera.config import Settings
from tessera.lora import LoraAdapter, LoraSpec, adapter_from_bytes, adapter_to_bytes, random_adapter
from tessera.lora.adapter import B_SUFFIX
from tessera.lora.bounds import ScaleRange, publish_problem
from tessera.service.resources import Resources
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import make_clustering
from tests.services.aggregator.helpers import lora_file, nothing_stored, open_round, upload


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """As in a worker process (see tasks.federation): MKL's threaded SVD crawls on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("alpha", [1e30, 1e308, 1e-6])
def test_a_lora_scale_out_of_range_is_422_without_echoing_it(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    alpha: float,
) -> None:
    round_ = open_round(aggregator, operator)

    data = lora_file(spec, alpha=alpha)
    response = upload(aggregator, device["token"], round_["id"], device["id"], data)

    assert response.status_code == 422, response.text
    assert response.json() == {
        "detail": "alpha: the LoRA scale alpha / rank is out of range "
        "(expected alpha / rank in [0.001, 16])",
        "key": "alpha",
        "expected": "alpha / rank in [0.001, 16]",
    }
    assert repr(alpha) not in response.text and repr(alpha / 4) not in response.text
    assert nothing_stored(session, store, round_["id"], device["id"])


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"clip": "fixed"}, ""),
        ({"clip_norm": 3.0}, ""),
        ({"clip_multiplier": "nan"}, "clip_multiplier"),
        ({"max_weight_ratio": 0.5}, "max_weight_ratio"),
        ({"weighting": "by-loss"}, "weighting"),
        ({"clip": "fixed", "clip_norm": 1e300}, "clip_norm"),
        ({"robust": "median-of-means"}, "robust"),
        ({"robust_trim": 0.5}, "robust_trim"),
        ({"staleness_exponent": 4.5}, "staleness_exponent"),
        ({"staleness_exponent": -1}, "staleness_exponent"),
    ],
)
def test_round_bounds_are_validated(
    aggregator: TestClient, operator: dict, config: dict, field: str
) -> None:
    response = aggregator.post("/v1/rounds", json=config, headers=operator)

    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    if field:
        assert errors[0]["loc"][-1] == field
    else:
        assert "clip_norm is required with clip 'fixed' and only then" in errors[0]["msg"]
    assert "1e+300" not in response.text and "by-loss" not in response.text


def test_private_and_secure_rounds_refuse_staleness_weights(
    aggregator: TestClient, operator: dict
) -> None:
    private = {"noise_multiplier": 1.0, "clip": "fixed", "clip_norm": 1.0, "weighting": "equal"}
    secure = {"method": "secure", "lam": 0.0}

    refused = [
        aggregator.post("/v1/rounds", json={**config, "staleness_exponent": 1.0}, headers=operator)
        for config in (private, secure)
    ]

    assert [r.status_code for r in refused] == [422, 422]
    assert "needs staleness_exponent 0.0" in refused[0].text
    assert "and staleness_exponent 0" in refused[1].text


@pytest.mark.usefixtures("one_torch_thread")
def test_a_poisoned_round_publishes_bounded_adapters_and_shows_its_exclusions(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    store: ObjectStore,
    settings: Settings,
) -> None:
    devices = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(4)]
    make_clustering(session, {d["id"]: 0 for d in devices})
    round_ = open_round(aggregator, operator, min_updates=4, rank=16, lam=0.0)
    honest = [random_adapter(spec, 4, 4.0, seed=i, std=0.3) for i in range(3)]
    attacker = _scaled_b(random_adapter(spec, 4, 4.0, seed=3, std=0.3), 1000.0)
    for d, lora in zip(devices, [*honest, attacker], strict=True):
        samples = 1_000_000 if lora is attacker else 16
        sent = upload(
            aggregator,
            d["token"],
            round_["id"],
            d["id"],
            adapter_to_bytes(lora),
            num_samples=samples,
        )
        assert sent.status_code == 201, sent.text
    disabled = aggregator.patch(
        f"/v1/clients/{devices[2]['id']}", json={"disabled": True}, headers=operator
    )
    assert disabled.status_code == 200, disabled.text

    resources = Resources(settings)
    try:
        summary = aggregate_round_now(
            round_["id"],
            sessions=resources.sessions,
            store=resources.store,
            redis=resources.redis,
            scales=ScaleRange(settings.min_lora_scale, settings.max_lora_scale),
        )
    finally:
        resources.close()
    seen_by_operator = aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json()
    seen_by_attacker = aggregator.get(
        f"/v1/rounds/{round_['id']}", headers=bearer(devices[3]["token"])
    ).json()

    assert summary["status"] == "published"
    assert seen_by_operator["state"] == "published"
    assert [(e["client_id"], e["reason"]) for e in seen_by_operator["excluded"]] == [
        (devices[2]["id"], f"client {devices[2]['id']} is disabled")
    ]
    (cluster,) = seen_by_operator["report"]["clusters"]
    assert (cluster["used"], cluster["clipped"], cluster["published"]) == (3, 1, True)
    assert seen_by_attacker["excluded"] == [] and seen_by_attacker["report"] is None
    for version in seen_by_operator["published"]:
        adapter = _download(aggregator, operator, version["version_id"])
        assert publish_problem(adapter) is None
    # The attacker (x1000, a million samples) weighs twice the median and is clipped to twice
    # the median norm: the cluster adapter is within the honest ones' reach.
    cluster_id = next(v for v in seen_by_operator["published"] if v["name"] == "cluster:0")
    adapter = _download(aggregator, operator, cluster_id["version_id"])
    honest_norm = _norm(honest[0])
    assert _norm(adapter) < 2 * honest_norm


def test_the_cli_opens_a_round_with_bounds_and_shows_its_exclusions(
    settings: Settings, operator: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def operator_client(_base_url: str | None = None) -> TestClient:
        return TestClient(create_app(settings), headers=operator)

    monkeypatch.setattr(cli, "_operator_client", operator_client)
    runner = CliRunner()

    opened = runner.invoke(
        cli.main,
        [
            "round",
            "open",
            *("--weighting", "equal", "--clip", "fixed", "--clip-norm", "2"),
            *("--robust", "krum", "--robust-f", "2", "--power-passes", "3"),
        ],
    )
    bad = runner.invoke(cli.main, ["round", "open", "--clip", "fixed"])
    round_id = json.loads(opened.stdout)["id"]
    shown = runner.invoke(cli.main, ["round", "show", str(round_id)])

    assert opened.exit_code == 0, opened.output
    config = json.loads(shown.stdout)["config"]
    assert (config["weighting"], config["clip"], config["clip_norm"]) == ("equal", "fixed", 2.0)
    assert (config["robust"], config["robust_f"], config["power_passes"]) == ("krum", 2, 3)
    assert json.loads(shown.stdout)["excluded"] == []
    assert bad.exit_code != 0 and "422" in bad.output


def _scaled_b(lora: LoraAdapter, factor: float) -> LoraAdapter:
    tensors = {k: v * factor if k.endswith(B_SUFFIX) else v for k, v in lora.tensors.items()}
    return dataclasses.replace(lora, tensors=tensors)


def _norm(lora: LoraAdapter) -> float:
    return math.sqrt(sum(float(lora.delta(m).double().square().sum()) for m in lora.modules))


def _download(client: TestClient, operator: dict, version_id: int) -> LoraAdapter:
    info = client.get(f"/v1/adapter-versions/{version_id}", headers=operator).json()
    return adapter_from_bytes(httpx.get(info["download_url"], timeout=30).content)
