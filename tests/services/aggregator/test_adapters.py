"""Adapter versions: metadata and presigned downloads, and who may read which."""

from __future__ import annotations

import hashlib

import httpx
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tessera.federation import GLOBAL_ADAPTER, personal_adapter_name
from tessera.models import AdapterKind
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import publish


def test_latest_version_comes_with_a_working_download_url(
    aggregator: TestClient, device: dict, session: Session, store: ObjectStore
) -> None:
    publish(session, store, GLOBAL_ADAPTER, b"v1", kind=AdapterKind.GLOBAL)
    newest = publish(session, store, GLOBAL_ADAPTER, b"v2", kind=AdapterKind.GLOBAL)

    latest = aggregator.get("/v1/adapters/global/versions/latest", headers=bearer(device["token"]))
    by_id = aggregator.get(f"/v1/adapter-versions/{newest.id}", headers=bearer(device["token"]))

    assert latest.status_code == 200, latest.text
    body = latest.json()
    assert (body["name"], body["version"], body["version_id"]) == ("global", 2, newest.id)
    assert body["sha256"] == hashlib.sha256(b"v2").hexdigest()
    assert body["metrics"] == {"energy_kept": 0.99}
    assert httpx.get(body["download_url"]).content == b"v2"
    assert by_id.json()["version_id"] == newest.id


def test_missing_adapters_are_404(aggregator: TestClient, device: dict) -> None:
    token = bearer(device["token"])

    latest = aggregator.get("/v1/adapters/cluster:9/versions/latest", headers=token)
    by_id = aggregator.get("/v1/adapter-versions/31", headers=token)

    assert latest.status_code == 404
    assert "cluster:9" not in latest.text and "no such adapter" in latest.json()["detail"]
    assert by_id.status_code == 404
    assert by_id.json()["detail"] == "no such adapter version"


def test_version_ids_outside_the_database_range_are_422(
    aggregator: TestClient, device: dict
) -> None:
    for version_id in (0, 2**31, 2**63):
        response = aggregator.get(
            f"/v1/adapter-versions/{version_id}", headers=bearer(device["token"])
        )

        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["path", "version_id"]


def test_a_device_reads_only_its_own_personal_adapter(
    aggregator: TestClient, device: dict, other_device: dict, session: Session, store: ObjectStore
) -> None:
    for d in (device, other_device):
        publish(
            session,
            store,
            personal_adapter_name(d["id"]),
            b"mine",
            kind=AdapterKind.PERSONAL,
            client_id=d["id"],
        )
    token = bearer(device["token"])

    own = aggregator.get(f"/v1/adapters/personal:{device['id']}/versions/latest", headers=token)
    other = aggregator.get(
        f"/v1/adapters/personal:{other_device['id']}/versions/latest", headers=token
    )

    assert own.status_code == 200
    assert other.status_code == 403


def test_list_adapters_for_generators_and_operators(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    device: dict,
    session: Session,
    store: ObjectStore,
) -> None:
    publish(session, store, GLOBAL_ADAPTER, b"v1", kind=AdapterKind.GLOBAL)
    publish(session, store, GLOBAL_ADAPTER, b"v2", kind=AdapterKind.GLOBAL)
    publish(session, store, "cluster:0", b"c0", kind=AdapterKind.CLUSTER, cluster_label=0)
    generator = enrol(aggregator, operator_token, "gen", role="generator")

    listed = aggregator.get("/v1/adapters", headers=bearer(generator["token"])).json()
    by_device = aggregator.get("/v1/adapters", headers=bearer(device["token"]))

    assert [(a["name"], a["versions"], a["latest"]["version"]) for a in listed] == [
        ("cluster:0", 1, 1),
        ("global", 2, 2),
    ]
    assert "download_url" not in listed[0]["latest"]
    assert aggregator.get("/v1/adapters", headers=operator).status_code == 200
    assert by_device.status_code == 403


def test_malformed_adapter_names_are_422(aggregator: TestClient, device: dict) -> None:
    token = bearer(device["token"])

    codes = [
        aggregator.get(f"/v1/adapters/{name}/versions/latest", headers=token).status_code
        for name in ("%00global", "-global", "a" * 129, "cluster%209")
    ]

    assert codes == [422] * 4  # before any database sees it (PostgreSQL refuses a NUL)
