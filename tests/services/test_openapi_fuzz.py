"""Schemathesis over each service's OpenAPI: every operation, a fixed number of generated
requests from a fixed seed, with valid tokens; no answer may be a server error (5xx other than
a backend's 503)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from sqlalchemy.orm import Session

from services.aggregator.main import create_app as create_aggregator
from services.clustering import crud as clustering_crud
from services.clustering.main import create_app as create_clustering
from services.inference.api.main import create_app as create_inference
from tessera.config import Settings
from tessera.federation import task_vector_bytes
from tessera.models import Role, TaskEmbedding
from tests.helpers import bearer, on_redis_db
from tests.services.inference.helpers import make_client

pytestmark = pytest.mark.slow

EXAMPLES = 5  # per operation and mode (valid, then invalid requests)
TASK_DIM = 384
FUZZ_DB = 4  # a Redis database of its own: nothing consumes what the fuzzed requests queue
FACTORIES = {
    "aggregator": create_aggregator,
    "clustering": create_clustering,
    "inference": create_inference,
}


@pytest.fixture(params=sorted(FACTORIES))
def service(request: pytest.FixtureRequest, settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    own = on_redis_db(settings, FUZZ_DB)
    app = FACTORIES[request.param](own)
    with TestClient(app):  # runs the lifespan (bucket, deadline loop) around the run
        yield request.param, app


@pytest.fixture
def token_for(settings: Settings, session: Session) -> Callable[[str, str], str]:
    """The token of the role an operation is meant for, so that requests reach its validation
    and logic: a device or a generator enrolled for this request (an earlier request may have
    disabled or rotated any client), else the bootstrap operator."""

    def token(path: str, method: str) -> str:
        if path.startswith("/v1/devices/me") or "/updates/" in path or "/secagg" in path:
            return make_client(session, settings, Role.DEVICE)[1]
        if path.startswith("/v1/generations") and method.upper() == "POST":
            return make_client(session, settings, Role.GENERATOR)[1]
        return settings.operator_token.get_secret_value()

    return token


def _update_slot(app: FastAPI, settings: Settings, session: Session) -> tuple[dict, str]:
    """A collecting round and a device's own slot in it, so that uploads reach the file checks."""
    api = TestClient(app)
    operator = bearer(settings.operator_token.get_secret_value())
    for round_ in api.get("/v1/rounds", headers=operator).json():
        if round_["state"] == "collecting":
            api.post(f"/v1/rounds/{round_['id']}/cancel", headers=operator)
    opened = api.post("/v1/rounds", json={"min_updates": 1000}, headers=operator)
    assert opened.status_code == 201, opened.text
    client_id, token = make_client(session, settings, Role.DEVICE)
    return {"round_id": opened.json()["id"], "client_id": client_id}, token


def _seed_clustering(app: FastAPI, settings: Settings, session: Session) -> None:
    """Six devices' task vectors around two directions and a clustering of them, so that routing
    and assignment requests reach their logic instead of a 404."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, TASK_DIM))
    for index in range(6):
        client_id, _ = make_client(session, settings, Role.DEVICE)
        vector = centres[index % 2] + rng.normal(scale=0.05, size=TASK_DIM)
        session.add(
            TaskEmbedding(
                client_id=client_id,
                vector=task_vector_bytes((vector / np.linalg.norm(vector)).tolist()),
                dim=TASK_DIM,
                encoder_id="test-encoder",
            )
        )
    session.commit()
    clustering_crud.recluster(session=session)  # what a worker runs for POST /v1/clusterings
    session.commit()


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    token_for: Callable[[str, str], str],
    outcomes: dict[str, list[int]],
    slot: tuple[dict, str] | None = None,
) -> None:
    """EXAMPLES generated requests of `mode` to one operation, the same ones every run; with a
    slot, an update upload's path and token are the slot's."""
    key = f"{operation.method.upper()} {operation.path}"
    path_parameters = None if slot is None else slot[0]

    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Any) -> None:
        token = token_for(case.path, case.method) if slot is None else slot[1]
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        outcomes.setdefault(key, []).append(response.status_code)
        if response.status_code >= 500 and response.status_code != 503:
            failures.append(f"{key} -> {response.status_code}: {response.text[:200]}")

    failures: list[str] = []
    one()
    assert not failures, failures[:3]


def test_no_request_gets_a_server_error(
    service: tuple[str, FastAPI],
    token_for: Callable[[str, str], str],
    settings: Settings,
    session: Session,
) -> None:
    name, app = service
    if name == "clustering":
        _seed_clustering(app, settings, session)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    outcomes: dict[str, list[int]] = {}
    failed: list[str] = []

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            slot = None
            if "/updates/" in operation.path:
                slot = _update_slot(app, settings, session)
            try:
                _fuzz(operation, mode, token_for, outcomes, slot)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation without inputs to break
            except AssertionError as error:
                failed.append(str(error))

    examples = sum(len(codes) for codes in outcomes.values())
    print(f"{name}: {len(outcomes)} operations, {examples} requests, {len(failed)} failing")
    for key, codes in sorted(outcomes.items()):
        print(f"  {key}: {sorted(set(codes))}")
    assert not failed, "\n".join(failed)
