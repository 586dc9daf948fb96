"""Scoped service tokens: the aggregator and the inference API call the clustering service with
a token that opens only the one endpoint they need, never with the operator token."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.clustering.main import create_app as create_clustering_app
from tessera.config import Settings
from tessera.model.encoder import MINILM_ID
from tessera.tokens import ServiceScope, service_token
from tests.helpers import bearer, enrol

MINILM_WIDTH = 384


def _vectors(seed: int) -> list[list[float]]:
    x = np.random.default_rng(seed).normal(size=(2, MINILM_WIDTH))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).tolist()


def _token(settings: Settings, scope: ServiceScope) -> str:
    return service_token(scope, secret=settings.token_secret.get_secret_value())


@pytest.fixture
def clustering(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_clustering_app(settings)) as client:
        yield client


def test_each_scope_opens_only_its_endpoint(
    clustering: TestClient, settings: Settings, operator_token: str
) -> None:
    assign, route = _token(settings, ServiceScope.ASSIGN), _token(settings, ServiceScope.ROUTE)
    route_body = {"vector": _vectors(0)[0], "top_k": 2, "temperature": 0.1}
    other_secret = service_token(ServiceScope.ASSIGN, secret="another-token-secret-of-32-chars")

    assigned = clustering.post(
        "/v1/assignments", json={"client_id": 123456}, headers=bearer(assign)
    )
    routed = clustering.post("/v1/route", json=route_body, headers=bearer(route))
    crossed = [
        clustering.post("/v1/assignments", json={"client_id": 123456}, headers=bearer(route)),
        clustering.post("/v1/route", json=route_body, headers=bearer(assign)),
    ]
    elsewhere = [
        clustering.post("/v1/clusterings", json={}, headers=bearer(assign)),
        clustering.get("/v1/clusterings/current", headers=bearer(route)),
        clustering.get("/v1/assignments/123456", headers=bearer(assign)),
    ]
    forged = clustering.post(
        "/v1/assignments", json={"client_id": 123456}, headers=bearer(other_secret)
    )

    assert assigned.status_code == 404, assigned.text  # past auth: no such client
    assert routed.status_code == 404, routed.text  # past auth: no clustering yet
    for answer in crossed + elsewhere:
        assert answer.status_code == 403, answer.text
        assert "service token of scope clustering." in answer.json()["detail"]
    assert forged.status_code == 401
    # The operator token still opens both (operators may call them by hand).
    operator = clustering.post(
        "/v1/assignments", json={"client_id": 123456}, headers=bearer(operator_token)
    )
    assert operator.status_code == 404


def test_the_aggregator_assigns_devices_with_its_scoped_token_not_the_operator_token(
    aggregator: TestClient, settings: Settings, operator_token: str
) -> None:
    # The clustering service knows another operator token: only the shared secret's scoped
    # token can get the aggregator's assignment through.
    own_operator = settings.model_copy(
        update={"operator_token": SecretStr("a-different-operator-token-for-clustering")}
    )
    other_secret = settings.model_copy(
        update={"token_secret": SecretStr("a-different-token-secret-for-clustering")}
    )
    answers = []
    for index, clustering_settings in enumerate((own_operator, other_secret)):
        with TestClient(create_clustering_app(clustering_settings)) as clustering:
            aggregator.app.state.clustering_http = clustering  # type: ignore[attr-defined]
            device = enrol(aggregator, operator_token, f"edge-{index}")
            answers.append(
                aggregator.post(
                    "/v1/devices/me/task-vectors",
                    json={"encoder_id": MINILM_ID, "vectors": _vectors(index)},
                    headers=bearer(device["token"]),
                )
            )

    assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
    assert answers[0].json()["assignment"]["cluster"] is not None
    assert answers[1].json()["assignment"] is None  # refused: not the same token secret
