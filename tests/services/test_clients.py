"""Enrolment over HTTP, and every kind of bad input refused with a 4xx that names the problem."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tessera.models import Client
from tests.helpers import bearer, enrol


def _client_count(session: Session) -> int:
    session.expire_all()
    return session.scalar(select(func.count()).select_from(Client)) or 0


def test_enrol_returns_the_token_once(aggregator: TestClient, operator_token: str) -> None:
    created = enrol(aggregator, operator_token, "edge-01")

    listed = aggregator.get("/v1/clients", headers=bearer(operator_token)).json()
    me = aggregator.get("/v1/clients/me", headers=bearer(created["token"])).json()

    assert created["token"].startswith("tsr_")
    assert created["role"] == "device"
    assert [c["name"] for c in listed] == ["edge-01"]
    assert all("token" not in c for c in listed)
    assert me["id"] == created["id"]


def test_duplicate_name_is_409(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    enrol(aggregator, operator_token, "edge-02")

    again = aggregator.post("/v1/clients", json={"name": "edge-02"}, headers=bearer(operator_token))

    assert again.status_code == 409
    assert again.json()["detail"] == "another client already has this name"
    assert _client_count(session) == 1


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"name": "ok", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"name": 12}, "name", "Input should be a valid string"),
        ({"name": ""}, "name", "at least 1 character"),
        ({"name": "has space"}, "name", "should match pattern"),
        ({"name": "x" * 129}, "name", "at most 128 characters"),
        ({"name": "ok", "role": "admin"}, "role", "Input should be"),
        ({}, "name", "Field required"),
    ],
)
def test_bad_bodies_name_the_field_and_store_nothing(
    aggregator: TestClient,
    operator_token: str,
    session: Session,
    body: dict,
    field: str,
    problem: str,
) -> None:
    response = aggregator.post("/v1/clients", json=body, headers=bearer(operator_token))

    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(e["loc"][-1] == field and problem in e["msg"] for e in errors), errors
    assert all("input" not in e for e in errors)
    assert _client_count(session) == 0


def test_malformed_json_is_422(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    response = aggregator.post(
        "/v1/clients",
        content=b'{"name": "edge-03",',
        headers={**bearer(operator_token), "Content-Type": "application/json"},
    )

    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"
    assert _client_count(session) == 0


def test_body_over_the_limit_is_413(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    huge = {"name": "edge-04", "padding": "x" * (5 * 1024 * 1024)}

    response = aggregator.post("/v1/clients", json=huge, headers=bearer(operator_token))

    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert _client_count(session) == 0


def test_wrong_path_parameter_type_is_422(aggregator: TestClient, operator_token: str) -> None:
    response = aggregator.get("/v1/clients/abc", headers=bearer(operator_token))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "client_id"]


@pytest.mark.parametrize("client_id", [0, 2**31, 2**63])
def test_client_ids_outside_the_database_range_are_422(
    aggregator: TestClient, operator_token: str, client_id: int
) -> None:
    token = bearer(operator_token)

    for response in (
        aggregator.get(f"/v1/clients/{client_id}", headers=token),
        aggregator.patch(f"/v1/clients/{client_id}", json={"disabled": True}, headers=token),
        aggregator.post(f"/v1/clients/{client_id}/token", headers=token),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["path", "client_id"]


def test_unknown_client_is_404(aggregator: TestClient, operator_token: str) -> None:
    response = aggregator.patch(
        "/v1/clients/999999", json={"disabled": True}, headers=bearer(operator_token)
    )

    assert response.status_code == 404
    assert response.json()["detail"] == "no such client"


def test_patch_refuses_unknown_fields(aggregator: TestClient, operator_token: str) -> None:
    device = enrol(aggregator, operator_token, "edge-05")

    response = aggregator.patch(
        f"/v1/clients/{device['id']}",
        json={"disabled": True, "role": "operator"},
        headers=bearer(operator_token),
    )
    me = aggregator.get("/v1/clients/me", headers=bearer(device["token"]))

    assert response.status_code == 422
    assert me.json()["role"] == "device"
    assert me.json()["disabled"] is False
