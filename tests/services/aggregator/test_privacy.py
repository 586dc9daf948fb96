"""Differential privacy through the HTTP API: epsilon per device, the budget, private rounds."""

from __future__ import annotations

import json
from collections.abc import Iterator

import dp_accounting
import httpx
import pytest
import torch
from click.testing import CliRunner
from dp_accounting.rdp import RdpAccountant
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from services.worker.rounds import aggregate_round_now
from tessera import cli
from tessera.config import Settings
from tessera.lora import LoraSpec, adapter_from_bytes, adapter_to_bytes, random_adapter
from tessera.lora.bounds import ScaleRange, publish_problem
from tessera.service.resources import Resources
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import make_clustering
from tests.services.aggregator.helpers import open_round, upload

DELTA = 1e-5
MULTIPLIER = 2.0
PRIVATE = {
    "rank": 4,
    "lam": 0.0,
    "min_updates": 2,
    "clip": "fixed",
    "clip_norm": 1.0,
    "weighting": "equal",
    "noise_multiplier": MULTIPLIER,
}


def library_epsilon(rounds: int) -> float:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(MULTIPLIER), rounds)
    return float(RdpAccountant().compose(event).get_epsilon(DELTA))


BUDGET = (library_epsilon(2) + library_epsilon(3)) / 2  # two rounds fit, a third does not


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"dp_epsilon_budget": BUDGET, "dp_delta": DELTA})


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def aggregate(settings: Settings, round_id: int) -> None:
    resources = Resources(settings)
    try:
        summary = aggregate_round_now(
            round_id,
            sessions=resources.sessions,
            store=resources.store,
            redis=resources.redis,
            scales=ScaleRange(settings.min_lora_scale, settings.max_lora_scale),
        )
    finally:
        resources.close()
    assert summary["status"] == "published", summary


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_epsilon_grows_per_round_until_the_budget_refuses_the_next(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    spec: LoraSpec,
    session: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    devices = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(2)]
    make_clustering(session, {d["id"]: 0 for d in devices})

    not_private = aggregator.post("/v1/rounds", json={"rank": 4}, headers=operator)
    seen = []
    for number in (1, 2):
        round_ = open_round(aggregator, operator, **PRIVATE)
        for i, d in enumerate(devices):
            lora = random_adapter(spec, 4, 4.0, seed=10 * number + i, std=0.3)
            sent = upload(aggregator, d["token"], round_["id"], d["id"], adapter_to_bytes(lora))
            assert sent.status_code == 201, sent.text
        aggregate(settings, round_["id"])
        seen.append(aggregator.get(f"/v1/rounds/{round_['id']}", headers=operator).json())
    own = aggregator.get(f"/v1/rounds/{seen[-1]['id']}", headers=bearer(devices[0]["token"]))
    spent = aggregator.post("/v1/rounds", json=PRIVATE, headers=operator)

    assert not_private.status_code == 409
    assert "TESSERA_DP_EPSILON_BUDGET" in not_private.json()["detail"]
    for number, shown in enumerate(seen, start=1):
        privacy = shown["privacy"]
        assert (privacy["noise_multiplier"], privacy["clip_norm"]) == (MULTIPLIER, 1.0)
        assert (privacy["delta"], privacy["epsilon_budget"]) == (DELTA, BUDGET)
        assert [(d["client_id"], d["rounds"]) for d in privacy["devices"]] == [
            (d["id"], number) for d in devices
        ]
        for device in privacy["devices"]:
            assert device["epsilon"] == pytest.approx(library_epsilon(number), rel=1e-9)
        for version in shown["published"]:
            info = aggregator.get(f"/v1/adapter-versions/{version['version_id']}", headers=operator)
            data = httpx.get(info.json()["download_url"], timeout=30).content
            assert publish_problem(adapter_from_bytes(data)) is None
    assert seen[0]["privacy"]["max_epsilon"] < seen[1]["privacy"]["max_epsilon"] < BUDGET
    assert [d["client_id"] for d in own.json()["privacy"]["devices"]] == [devices[0]["id"]]
    assert spent.status_code == 409, spent.text
    assert "privacy budget is spent" in spent.json()["detail"]

    def operator_client(_base_url: str | None = None) -> TestClient:
        return TestClient(create_app(settings), headers=operator)

    monkeypatch.setattr(cli, "_operator_client", operator_client)
    shown = CliRunner().invoke(cli.main, ["round", "show", str(seen[-1]["id"])])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["privacy"]["max_epsilon"] == pytest.approx(library_epsilon(2))


def test_the_federations_noise_multiplier_makes_every_round_private(
    settings: Settings, operator: dict
) -> None:
    private = settings.model_copy(update={"dp_noise_multiplier": 3.0, "dp_epsilon_budget": None})
    with TestClient(create_app(private)) as client:
        adaptive = client.post("/v1/rounds", json={"rank": 4}, headers=operator)
        fixed = client.post(
            "/v1/rounds",
            json={"rank": 4, "clip": "fixed", "clip_norm": 2.0, "weighting": "equal"},
            headers=operator,
        )

    assert adaptive.status_code == 422
    detail = adaptive.json()["detail"]
    assert "TESSERA_DP_NOISE_MULTIPLIER" in detail and "clip 'fixed'" in detail
    assert fixed.status_code == 201, fixed.text
    assert fixed.json()["config"]["noise_multiplier"] == 3.0
    assert fixed.json()["privacy"]["devices"] == []


@pytest.mark.parametrize(
    "config",
    [
        {"noise_multiplier": 1.0},
        {**PRIVATE, "clip": "adaptive", "clip_norm": None},
        {**PRIVATE, "weighting": "samples"},
        {**PRIVATE, "robust": "krum"},
        {**PRIVATE, "method": "fedavg"},
        {**PRIVATE, "noise_multiplier": 0.0},
    ],
)
def test_a_private_round_must_bound_each_update(
    aggregator: TestClient, operator: dict, config: dict
) -> None:
    response = aggregator.post("/v1/rounds", json=config, headers=operator)

    assert response.status_code == 422, response.text
