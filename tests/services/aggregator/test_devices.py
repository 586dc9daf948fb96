"""A device's task vectors and its assignment, through the real clustering app."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.clustering.main import create_app as create_clustering_app
from tessera.config import Settings
from tessera.federation import GLOBAL_ADAPTER, cluster_adapter_name
from tessera.model.encoder import MINILM_ID
from tessera.models import AdapterKind, TaskEmbedding
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.factories import make_clustering, publish
from tests.services.aggregator.helpers import open_round

TASK_WIDTH = 384  # MiniLM's vectors: the federation's task encoder in tests (`minilm`)


def unit_vectors(count: int, seed: int, around: np.ndarray | None = None) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, TASK_WIDTH))
    if around is not None:
        x = around + 0.05 * x
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.tolist()


def _stored_vectors(session: Session, client_id: int) -> int:
    session.expire_all()
    query = select(func.count()).where(TaskEmbedding.client_id == client_id)
    return session.scalar(query) or 0


@pytest.fixture
def clustering_api(aggregator: TestClient, settings: Settings) -> Iterator[TestClient]:
    """The real clustering app, in place of the aggregator's HTTP client to it."""
    with TestClient(create_clustering_app(settings)) as client:
        aggregator.app.state.clustering_http = client  # type: ignore[attr-defined]
        yield client


def _post_vectors(client: TestClient, token: str, vectors: list, encoder_id: str = MINILM_ID):
    return client.post(
        "/v1/devices/me/task-vectors",
        json={"encoder_id": encoder_id, "vectors": vectors},
        headers=bearer(token),
    )


@pytest.mark.usefixtures("clustering_api")
def test_task_vectors_are_stored_and_the_device_assigned(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    centres = np.eye(TASK_WIDTH)[:2] * 1.0
    devices = [enrol(aggregator, operator_token, f"edge-{i}") for i in range(4)]

    answers = [
        _post_vectors(aggregator, d["token"], unit_vectors(3, seed=i, around=centres[i % 2]))
        for i, d in enumerate(devices)
    ]
    again = _post_vectors(aggregator, devices[0]["token"], unit_vectors(2, 9, centres[0]))
    read = aggregator.get("/v1/devices/me/assignment", headers=bearer(devices[0]["token"]))

    for answer in answers:
        assert answer.status_code == 201, answer.text
        assert answer.json()["stored"] == 3
        assert answer.json()["assignment"]["cluster"] is not None
    assert again.status_code == 201
    assert _stored_vectors(session, devices[0]["id"]) == 2  # replaced, not added
    assignment = read.json()
    assert assignment["client_id"] == devices[0]["id"]
    assert assignment["cluster"] == again.json()["assignment"]["cluster"]
    assert assignment["clustering_version"] >= 1
    assert assignment["start_adapter"] is None
    assert assignment["current_round"] is None


def test_vectors_are_kept_when_the_clustering_service_is_down(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    aggregator.app.state.clustering_http = httpx.Client(  # type: ignore[attr-defined]
        base_url="http://127.0.0.1:9", timeout=1
    )
    device = enrol(aggregator, operator_token, "edge-01")

    response = _post_vectors(aggregator, device["token"], unit_vectors(2, seed=0))

    assert response.status_code == 201
    assert response.json() == {"stored": 2, "assignment": None}
    assert _stored_vectors(session, device["id"]) == 2


def _unnormalised() -> list[list[float]]:
    vectors = unit_vectors(3, seed=1)
    vectors[2] = [2 * v for v in vectors[2]]
    return vectors


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ({"encoder_id": "openai/clip", "vectors": unit_vectors(1, 0)}, ["task encoder", MINILM_ID]),
        ({"encoder_id": MINILM_ID, "vectors": [[1.0] + [0.0] * 99]}, ["vector 0", "100", "384"]),
        ({"encoder_id": MINILM_ID, "vectors": _unnormalised()}, ["vector 2", "not L2-normalised"]),
        ({"encoder_id": MINILM_ID, "vectors": []}, ["vectors"]),
        ({"encoder_id": MINILM_ID, "vectors": unit_vectors(33, 0)}, ["vectors"]),
        ({"encoder_id": MINILM_ID, "vectors": unit_vectors(1, 0), "text": "hi"}, ["text"]),
    ],
    ids=["encoder", "dimension", "norm", "none", "too-many", "extra-field"],
)
def test_bad_task_vectors_are_422_and_nothing_is_stored(
    aggregator: TestClient, operator_token: str, session: Session, body: dict, expect: list[str]
) -> None:
    device = enrol(aggregator, operator_token, "edge-01")

    response = aggregator.post(
        "/v1/devices/me/task-vectors", json=body, headers=bearer(device["token"])
    )

    assert response.status_code == 422
    assert all(part in response.text for part in expect), response.text
    assert _stored_vectors(session, device["id"]) == 0


def test_a_foreign_encoder_is_refused_without_echoing_its_id(
    aggregator: TestClient, operator_token: str
) -> None:
    device = enrol(aggregator, operator_token, "edge-01")

    response = _post_vectors(
        aggregator, device["token"], unit_vectors(1, 0), encoder_id="<b>my-own-encoder</b>"
    )

    assert response.status_code == 422
    assert MINILM_ID in response.text and "my-own-encoder" not in response.text


def test_non_finite_values_are_422(aggregator: TestClient, operator_token: str) -> None:
    device = enrol(aggregator, operator_token, "edge-01")
    content = f'{{"encoder_id": "{MINILM_ID}", "vectors": [[NaN, 1.0]]}}'

    response = aggregator.post(
        "/v1/devices/me/task-vectors",
        content=content,
        headers={**bearer(device["token"]), "Content-Type": "application/json"},
    )

    assert response.status_code == 422
    assert ["body", "vectors", 0, 0] in [e["loc"] for e in response.json()["detail"]]


def test_only_devices_upload_task_vectors(aggregator: TestClient, operator_token: str) -> None:
    body = {"encoder_id": MINILM_ID, "vectors": unit_vectors(1, 0)}

    response = aggregator.post(
        "/v1/devices/me/task-vectors", json=body, headers=bearer(operator_token)
    )

    assert response.status_code == 403


def test_the_assignment_names_the_start_adapter_and_the_round(
    aggregator: TestClient,
    operator: dict,
    operator_token: str,
    session: Session,
    store: ObjectStore,
) -> None:
    device = enrol(aggregator, operator_token, "edge-01")
    make_clustering(session, {device["id"]: 3})
    publish(session, store, GLOBAL_ADAPTER, b"global-v1", kind=AdapterKind.GLOBAL)
    round_ = open_round(aggregator, operator, deadline_s=600)

    before_cluster_adapter = aggregator.get(
        "/v1/devices/me/assignment", headers=bearer(device["token"])
    ).json()
    publish(
        session,
        store,
        cluster_adapter_name(3),
        b"cluster-3",
        kind=AdapterKind.CLUSTER,
        cluster_label=3,
    )
    after = aggregator.get("/v1/devices/me/assignment", headers=bearer(device["token"])).json()

    assert before_cluster_adapter["cluster"] == 3
    assert before_cluster_adapter["similarity"] == pytest.approx(0.9)
    assert before_cluster_adapter["start_adapter"]["name"] == GLOBAL_ADAPTER
    assert after["start_adapter"]["name"] == "cluster:3"
    assert httpx.get(after["start_adapter"]["download_url"]).content == b"cluster-3"
    assert after["current_round"]["id"] == round_["id"]
    assert after["current_round"]["state"] == "collecting"
    assert (
        after["current_round"]["deadline"].endswith("Z")
        or "+00:00" in after["current_round"]["deadline"]
    )
