"""Bearer tokens and roles: 401 without a valid token, 403 for the wrong role."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from tessera.models import Client
from tests.helpers import bearer, enrol


def test_no_token_is_401_with_a_challenge(aggregator: TestClient) -> None:
    response = aggregator.get("/v1/clients")

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in response.json()["detail"]


def test_unknown_token_is_401(aggregator: TestClient) -> None:
    response = aggregator.get("/v1/clients", headers=bearer("tsr_not-a-real-token"))

    assert response.status_code == 401
    assert response.json()["detail"] == "invalid bearer token"


def test_wrong_scheme_is_401(aggregator: TestClient, operator_token: str) -> None:
    response = aggregator.get("/v1/clients", headers={"Authorization": f"Basic {operator_token}"})

    assert response.status_code == 401


def test_device_token_on_operator_endpoint_is_403(
    aggregator: TestClient, operator_token: str
) -> None:
    device = enrol(aggregator, operator_token, "device-a")

    response = aggregator.get("/v1/clients", headers=bearer(device["token"]))

    assert response.status_code == 403
    assert "needs role operator" in response.json()["detail"]


def test_generator_token_cannot_enrol(aggregator: TestClient, operator_token: str) -> None:
    generator = enrol(aggregator, operator_token, "studio", role="generator")

    response = aggregator.post(
        "/v1/clients", json={"name": "sneaky"}, headers=bearer(generator["token"])
    )

    assert response.status_code == 403


def test_disabled_client_is_401_and_can_be_re_enabled(
    aggregator: TestClient, operator_token: str
) -> None:
    device = enrol(aggregator, operator_token, "device-b")

    disabled = aggregator.patch(
        f"/v1/clients/{device['id']}", json={"disabled": True}, headers=bearer(operator_token)
    )
    refused = aggregator.get("/v1/clients/me", headers=bearer(device["token"]))
    aggregator.patch(
        f"/v1/clients/{device['id']}", json={"disabled": False}, headers=bearer(operator_token)
    )
    accepted = aggregator.get("/v1/clients/me", headers=bearer(device["token"]))

    assert disabled.json()["disabled"] is True
    assert refused.status_code == 401
    assert "disabled" in refused.json()["detail"]
    assert accepted.status_code == 200


def test_rotation_invalidates_the_old_token(aggregator: TestClient, operator_token: str) -> None:
    device = enrol(aggregator, operator_token, "device-c")

    rotated = aggregator.post(f"/v1/clients/{device['id']}/token", headers=bearer(operator_token))
    old = aggregator.get("/v1/clients/me", headers=bearer(device["token"]))
    new = aggregator.get("/v1/clients/me", headers=bearer(rotated.json()["token"]))

    assert rotated.status_code == 200
    assert old.status_code == 401
    assert new.status_code == 200
    assert new.json()["name"] == "device-c"


def test_tokens_are_stored_hashed(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    device = enrol(aggregator, operator_token, "device-d")

    stored = session.scalar(select(Client).where(Client.id == device["id"]))

    assert stored is not None
    assert device["token"] not in stored.token_hash
    assert len(stored.token_hash) == 64
