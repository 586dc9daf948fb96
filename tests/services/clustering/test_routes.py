"""The clustering API over a real database: reclustering, stable labels, assignment, routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.aggregator import crud as aggregator_crud
from services.clustering import crud
from services.clustering.algorithms import adjusted_rand_index
from tessera.config import Settings
from tessera.models import Assignment, Client, Cluster, Role
from tests.helpers import bearer
from tests.services.clustering.helpers import (
    CENTRES,
    Member,
    add_client,
    add_device,
    operator,
    run_here,
    tasks_near,
    upload,
)
from tests.services.clustering.synthetic import DIM, directions, unit


def recluster(api: TestClient, settings: Settings, **body: object) -> dict:
    """Queue a re-clustering, run its job as the worker does, return the clustering made."""
    response = api.post("/v1/clusterings", json=body, headers=operator(settings))
    assert response.status_code == 202, response.text
    assert run_here(settings, response.json()["id"])["state"] == "succeeded"
    current = api.get("/v1/clusterings/current", headers=operator(settings))
    assert current.status_code == 200, current.text
    return current.json()


def labels_by_client(clustering: dict) -> dict[int, int]:
    return {m: c["label"] for c in clustering["clusters"] for m in c["members"]}


def test_recluster_finds_three_clusters_and_stores_them(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    body = recluster(clustering_api, settings)

    found = labels_by_client(body)
    session.expire_all()
    clusters: list[Cluster] = list(session.scalars(select(Cluster).order_by(Cluster.label)))
    assignments: list[Assignment] = list(session.scalars(select(Assignment)))
    session.rollback()
    assert body["version"] == 1
    assert body["algorithm"] == "kmeans"
    assert body["params"] == {
        "method": "kmeans",
        "k": None,
        "seed": 0,
        "min_cluster_size": 2,
        "distance_threshold": None,
    }
    assert body["metrics"]["k"] == 3
    assert body["metrics"]["n_devices"] == 12
    assert body["metrics"]["noise"] == 0
    assert body["metrics"]["silhouette"] > 0.3
    assert body["metrics"]["sizes"] == {"0": 4, "1": 4, "2": 4}
    assert [(c["label"], c["size"]) for c in body["clusters"]] == [(0, 4), (1, 4), (2, 4)]
    assert adjusted_rand_index([m.truth for m in fleet], [found[m.id] for m in fleet]) == 1.0
    assert [(c.label, c.size, len(c.centroid)) for c in clusters] == [
        (0, 4, 4 * DIM),
        (1, 4, 4 * DIM),
        (2, 4, 4 * DIM),
    ]
    assert {a.client_id: a.label for a in assignments} == found
    assert all(a.similarity is not None and a.similarity > 0.8 for a in assignments)


def test_reclustering_noisier_vectors_keeps_labels_and_gives_a_new_group_a_fresh_one(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    before = labels_by_client(recluster(clustering_api, settings, k=3))
    for member in fleet:
        noisier = tasks_near(CENTRES[member.truth], seed=500 + member.id, count=3, noise=0.04)
        upload(session, member.id, noisier)
    newcomers = [add_client(session, settings, f"new-{i}").id for i in range(3)]
    fourth = unit(directions(4, seed=99)[3])
    for client_id in newcomers:
        upload(session, client_id, tasks_near(fourth, seed=client_id))

    body = recluster(clustering_api, settings, method="agglomerative")

    after = labels_by_client(body)
    assert body["version"] == 2
    assert body["metrics"]["k"] == 4
    assert {m.id: after[m.id] for m in fleet} == before
    assert {after[client_id] for client_id in newcomers} == {3}


def test_disabled_devices_and_other_roles_are_left_out(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    aggregator_crud.set_disabled(
        session=session, client=session.get_one(Client, fleet[0].id), disabled=True
    )
    generator = add_client(session, settings, "gen", Role.GENERATOR)
    upload(session, generator.id, tasks_near(CENTRES[0], seed=1))

    body = recluster(clustering_api, settings, k=3)

    assert body["metrics"]["n_devices"] == 11
    assert fleet[0].id not in labels_by_client(body)
    assert generator.id not in labels_by_client(body)


def test_one_device_makes_one_cluster_whatever_k(
    clustering_api: TestClient, settings: Settings, session: Session
) -> None:
    add_device(session, settings, "alone", 0, seed=1)

    body = recluster(clustering_api, settings, k=3)

    assert [(c["label"], c["size"]) for c in body["clusters"]] == [(0, 1)]
    assert body["metrics"]["k"] == 1


def test_hdbscan_finds_its_own_k(
    clustering_api: TestClient, settings: Settings, fleet: list[Member]
) -> None:
    body = recluster(clustering_api, settings, method="hdbscan", min_cluster_size=3)

    assert body["algorithm"] == "hdbscan"
    assert body["metrics"]["k"] == 3
    assert sorted(c["size"] for c in body["clusters"]) == [4, 4, 4]


def test_a_new_device_is_assigned_to_its_nearest_cluster_at_once(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    before = recluster(clustering_api, settings, k=3)
    expected = labels_by_client(before)[fleet[1].id]  # fleet[1] sits at centre 1
    newcomer = add_device(session, settings, "newcomer", 1, seed=77)

    first = clustering_api.post(
        "/v1/assignments", json={"client_id": newcomer.id}, headers=operator(settings)
    )
    again = clustering_api.post(
        "/v1/assignments", json={"client_id": newcomer.id}, headers=operator(settings)
    )
    current = clustering_api.get("/v1/clusterings/current", headers=operator(settings)).json()

    assert first.status_code == 200, first.text
    assert first.json()["clustering_version"] == 1
    assert first.json()["label"] == expected
    assert first.json()["similarity"] > 0.8
    assert again.json() == first.json()
    cluster = next(c for c in current["clusters"] if c["label"] == expected)
    assert newcomer.id in cluster["members"]
    assert cluster["size"] == 5
    assert sum(c["size"] for c in current["clusters"]) == 13


def test_a_device_that_uploads_again_moves_to_its_new_nearest_cluster(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    labels = labels_by_client(recluster(clustering_api, settings, k=3))
    mover = fleet[0]  # centre 0; moves to centre 2, like fleet[2]
    upload(session, mover.id, tasks_near(CENTRES[2], seed=5))

    moved = clustering_api.post(
        "/v1/assignments", json={"client_id": mover.id}, headers=operator(settings)
    )
    sizes = {
        c["label"]: c["size"]
        for c in clustering_api.get("/v1/clusterings/current", headers=operator(settings)).json()[
            "clusters"
        ]
    }

    assert moved.json()["label"] == labels[fleet[2].id]
    assert sizes[labels[fleet[0].id]] == 3
    assert sizes[labels[fleet[2].id]] == 5


def test_the_first_assignment_runs_the_first_clustering_over_every_device(
    clustering_api: TestClient, settings: Settings, fleet: list[Member]
) -> None:
    response = clustering_api.post(
        "/v1/assignments", json={"client_id": fleet[4].id}, headers=operator(settings)
    )
    current = clustering_api.get("/v1/clusterings/current", headers=operator(settings)).json()

    assert response.status_code == 200, response.text
    assert response.json()["clustering_version"] == 1
    assert current["metrics"]["n_devices"] == 12
    assert current["metrics"]["k"] == 3


def test_a_device_reads_only_its_own_assignment(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    labels = labels_by_client(recluster(clustering_api, settings, k=3))
    generator = add_client(session, settings, "gen", Role.GENERATOR)
    me, other = fleet[0], fleet[1]

    own = clustering_api.get(f"/v1/assignments/{me.id}", headers=bearer(me.token))
    others = clustering_api.get(f"/v1/assignments/{other.id}", headers=bearer(me.token))
    by_generator = clustering_api.get(f"/v1/assignments/{me.id}", headers=bearer(generator.token))
    by_operator = clustering_api.get(f"/v1/assignments/{other.id}", headers=operator(settings))

    assert own.status_code == 200
    assert own.json()["label"] == labels[me.id]
    assert own.json()["client_id"] == me.id
    assert own.json()["clustering_version"] == 1
    assert others.status_code == 403
    assert "only its own" in others.json()["detail"]
    assert by_generator.status_code == 403
    assert by_operator.status_code == 200
    assert by_operator.json()["label"] == labels[other.id]


def test_a_generation_client_sees_cluster_sizes_but_no_device_ids(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    recluster(clustering_api, settings, k=3)
    generator = add_client(session, settings, "gen", Role.GENERATOR)

    seen = clustering_api.get("/v1/clusterings/current", headers=bearer(generator.token))
    full = clustering_api.get("/v1/clusterings/current", headers=operator(settings))

    assert seen.status_code == 200, seen.text
    clusters = seen.json()["clusters"]
    assert [(c["label"], c["size"]) for c in clusters] == [
        (c["label"], c["size"]) for c in full.json()["clusters"]
    ]
    assert all(c["members"] is None for c in clusters)
    assert sorted(labels_by_client(full.json())) == sorted(m.id for m in fleet)


def test_route_weights_sum_to_one_and_favour_the_prompts_cluster(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    labels = labels_by_client(recluster(clustering_api, settings, k=3))
    generator = add_client(session, settings, "gen", Role.GENERATOR)
    prompt = tasks_near(CENTRES[2], seed=3, count=1)[0].tolist()

    top_two = clustering_api.post(
        "/v1/route", json={"vector": prompt}, headers=bearer(generator.token)
    )
    all_three = clustering_api.post(
        "/v1/route",
        json={"vector": prompt, "top_k": 3, "temperature": 1.0},
        headers=bearer(fleet[0].token),
    )

    assert top_two.status_code == 200, top_two.text
    weights = top_two.json()["weights"]
    assert top_two.json()["clustering_version"] == 1
    assert len(weights) == 2
    assert weights[0]["label"] == labels[fleet[2].id]
    assert weights[0]["weight"] > 0.9
    assert sum(w["weight"] for w in weights) == pytest.approx(1.0)
    spread = [w["weight"] for w in all_three.json()["weights"]]
    assert len(spread) == 3
    assert spread == sorted(spread, reverse=True)
    assert sum(spread) == pytest.approx(1.0)
    assert spread[0] < weights[0]["weight"]  # a warmer softmax spreads the weight


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/v1/clusterings", {}),
        ("get", "/v1/clusterings/current", None),
        ("post", "/v1/assignments", {"client_id": 1}),
        ("get", "/v1/assignments/1", None),
        ("post", "/v1/route", {"vector": [1.0]}),
    ],
)
def test_every_endpoint_needs_a_token(
    clustering_api: TestClient, method: str, path: str, body: dict | None
) -> None:
    response = clustering_api.request(method, path, json=body)
    wrong = clustering_api.request(method, path, json=body, headers=bearer("tsr_not-a-token"))

    assert response.status_code == 401
    assert "bearer token" in response.json()["detail"]
    assert wrong.status_code == 401


@pytest.mark.parametrize(
    ("role", "method", "path", "body"),
    [
        (Role.DEVICE, "post", "/v1/clusterings", {}),
        (Role.GENERATOR, "post", "/v1/clusterings", {}),
        (Role.DEVICE, "get", "/v1/clusterings/current", None),
        (Role.DEVICE, "post", "/v1/assignments", {"client_id": 1}),
        (Role.GENERATOR, "post", "/v1/assignments", {"client_id": 1}),
    ],
)
def test_wrong_roles_get_403(
    clustering_api: TestClient,
    settings: Settings,
    session: Session,
    role: Role,
    method: str,
    path: str,
    body: dict | None,
) -> None:
    caller = add_client(session, settings, "caller", role)

    response = clustering_api.request(method, path, json=body, headers=bearer(caller.token))

    assert response.status_code == 403
    assert f"the token is a {role.value}" in response.json()["detail"]


def test_before_any_clustering_reads_are_404(
    clustering_api: TestClient, settings: Settings, session: Session
) -> None:
    device = add_client(session, settings, "edge")
    unit_vector = unit(np.ones(DIM)).tolist()

    current = clustering_api.get("/v1/clusterings/current", headers=operator(settings))
    routed = clustering_api.post(
        "/v1/route", json={"vector": unit_vector}, headers=operator(settings)
    )
    own = clustering_api.get(f"/v1/assignments/{device.id}", headers=bearer(device.token))

    for response in (current, routed, own):
        assert response.status_code == 404
        assert "no clustering yet" in response.json()["detail"]


def test_reclustering_without_vectors_is_409_and_stores_nothing(
    clustering_api: TestClient, settings: Settings, session: Session
) -> None:
    add_client(session, settings, "edge-without-vectors")

    response = clustering_api.post("/v1/clusterings", json={}, headers=operator(settings))

    assert response.status_code == 409
    assert "no enabled device has uploaded task vectors" in response.json()["detail"]
    assert crud.current_clustering(session=session) is None


def test_vectors_of_another_width_are_409(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    recluster(clustering_api, settings, k=3)
    odd = add_client(session, settings, "odd-encoder")
    upload(session, odd.id, unit(np.ones((1, 8))))

    assigned = clustering_api.post(
        "/v1/assignments", json={"client_id": odd.id}, headers=operator(settings)
    )
    queued = clustering_api.post("/v1/clusterings", json={}, headers=operator(settings))
    job = run_here(settings, queued.json()["id"])

    assert assigned.status_code == 409
    assert "8 dimensions" in assigned.json()["detail"]
    assert queued.status_code == 202
    assert job["state"] == "failed"
    assert "different dimensions (8 for clients" in job["error"]


def test_assignment_refusals(
    clustering_api: TestClient, settings: Settings, session: Session, fleet: list[Member]
) -> None:
    recluster(clustering_api, settings, k=3)
    silent = add_client(session, settings, "silent")
    generator = add_client(session, settings, "gen", Role.GENERATOR)
    upload(session, generator.id, tasks_near(CENTRES[0], seed=1))

    def assign(client_id: int) -> tuple[int, str]:
        response = clustering_api.post(
            "/v1/assignments", json={"client_id": client_id}, headers=operator(settings)
        )
        return response.status_code, response.json()["detail"]

    assert assign(99_999) == (404, "no such client")
    status, detail = assign(silent.id)
    assert status == 404
    assert "has uploaded no task vectors" in detail
    status, detail = assign(generator.id)
    assert status == 409
    assert "is a generator" in detail
    unassigned = clustering_api.get(f"/v1/assignments/{silent.id}", headers=operator(settings))
    assert unassigned.status_code == 404
    assert "the client has no assignment in clustering version 1" in (unassigned.json()["detail"])


@pytest.mark.parametrize("client_id", [0, 2**31, 2**63])
def test_client_ids_outside_the_database_range_are_422(
    clustering_api: TestClient, settings: Settings, client_id: int
) -> None:
    assigned = clustering_api.post(
        "/v1/assignments", json={"client_id": client_id}, headers=operator(settings)
    )
    read = clustering_api.get(f"/v1/assignments/{client_id}", headers=operator(settings))

    assert assigned.status_code == 422, assigned.text
    assert assigned.json()["detail"][0]["loc"] == ["body", "client_id"]
    assert read.status_code == 422, read.text
    assert read.json()["detail"][0]["loc"] == ["path", "client_id"]


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"method": "spectral"}, "method", "Input should be"),
        ({"k": 0}, "k", "greater than or equal to 1"),
        ({"k": 65}, "k", "less than or equal to 64"),
        ({"min_cluster_size": 1}, "min_cluster_size", "greater than or equal to 2"),
        ({"distance_threshold": 0}, "distance_threshold", "greater than 0"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_clustering_options_are_422_naming_the_field(
    clustering_api: TestClient, settings: Settings, body: dict, field: str, problem: str
) -> None:
    response = clustering_api.post("/v1/clusterings", json=body, headers=operator(settings))

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"][-1] == field or field in error["loc"]
    assert problem in error["msg"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"method": "hdbscan", "k": 3}, "hdbscan chooses its own number of clusters"),
        ({"method": "kmeans", "distance_threshold": 0.5}, "applies to agglomerative only"),
        (
            {"method": "agglomerative", "k": 3, "distance_threshold": 0.5},
            "give k or distance_threshold, not both",
        ),
    ],
)
def test_contradictory_clustering_options_are_422_with_the_algorithms_message(
    clustering_api: TestClient,
    settings: Settings,
    session: Session,
    fleet: list[Member],
    body: dict,
    message: str,
) -> None:
    response = clustering_api.post("/v1/clusterings", json=body, headers=operator(settings))

    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert crud.current_clustering(session=session) is None


def test_bad_route_queries_are_422_naming_the_problem(
    clustering_api: TestClient, settings: Settings, fleet: list[Member]
) -> None:
    recluster(clustering_api, settings, k=3)
    good = unit(np.ones(DIM))

    def refused(body: dict) -> object:
        # json.dumps writes NaN as a bare NaN, which Python's JSON parser (and so FastAPI) reads.
        response = clustering_api.post(
            "/v1/route",
            content=json.dumps(body),
            headers={**operator(settings), "Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text
        return response.json()["detail"]

    assert "must have 384 dimensions, found 8" in str(
        refused({"vector": unit(np.ones(8)).tolist()})
    )
    assert "not L2-normalised" in str(refused({"vector": (2 * good).tolist()}))
    assert refused({"vector": [*good[:5], float("nan"), *good[6:]]}) == [
        {
            "loc": ["body", "vector", 5],
            "msg": "Input should be a finite number",
            "type": "finite_number",
        }
    ]
    assert "greater than or equal to 0.001" in str(
        refused({"vector": good.tolist(), "temperature": 0})
    )
    assert "greater than or equal to 0.001" in str(
        refused({"vector": good.tolist(), "temperature": 1e-320})
    )
    assert "finite number" in str(refused({"vector": good.tolist(), "temperature": float("inf")}))
    assert "less than or equal to 100" in str(
        refused({"vector": good.tolist(), "temperature": 101})
    )
    assert "greater than or equal to 1" in str(refused({"vector": good.tolist(), "top_k": 0}))
    assert "at least 1 item" in str(refused({"vector": []}))
