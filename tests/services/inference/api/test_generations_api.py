"""POST /v1/generations: what is accepted and queued, what is refused with nothing stored."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.clustering.main import create_app as create_clustering_app
from services.inference.api.main import create_app
from services.inference.embeddings import input_from_bytes
from services.worker.publishing import PublishedVersion
from tessera.config import Settings
from tessera.events import TASK_GENERATE
from tessera.federation import task_vector_bytes
from tessera.lora import LoraSpec, random_adapter
from tessera.models import Cluster, Clustering, GenerationJob, Role
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.inference.helpers import (
    embeds_b64,
    job_rows,
    make_client,
    publish,
    queued_jobs,
    raw_b64,
    tokens,
)

NAN = "__NAN__"


@pytest.fixture
def published(
    sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> dict[str, PublishedVersion]:
    """Two cluster adapters and a global one."""
    return {
        name: publish(sessions, store, name, random_adapter(spec, 4, 4.0, seed=seed))
        for seed, name in enumerate(["cluster:0", "cluster:1", "global"])
    }


def request(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_embeds": embeds_b64(tokens()),
        "adapters": [
            {"adapter": "cluster:0", "weight": 0.7},
            {"adapter": "cluster:1", "weight": 0.3},
        ],
        "steps": 4,
        "seed": 1,
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def post(api: TestClient, token: str, body: dict[str, Any], **headers: str):
    """POST as JSON text, so that a test can put NaN or Infinity where JSON forbids them."""
    text = json.dumps(body).replace(f'"{NAN}"', "NaN").replace('"__INF__"', "Infinity")
    return api.post(
        "/v1/generations",
        content=text,
        headers={**bearer(token), "Content-Type": "application/json", **headers},
    )


def nothing_queued(session: Session, store: ObjectStore, broker: redis.Redis) -> bool:
    return job_rows(session) == 0 and not store.list_keys("inputs/") and not queued_jobs(broker)


def test_a_request_is_stored_as_input_and_queued_by_id(
    api: TestClient,
    generator: tuple[int, str],
    published: dict[str, PublishedVersion],
    session: Session,
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    prompt = tokens(3)

    response = post(api, generator[1], request(prompt_embeds=embeds_b64(prompt), num_images=2))

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued"
    assert job["progress"] == {"step": 0, "total_steps": 4}
    assert [(a["adapter"], a["version_id"], a["weight"]) for a in job["adapters"]] == [
        ("cluster:0", published["cluster:0"].version_id, 0.7),
        ("cluster:1", published["cluster:1"].version_id, 0.3),
    ]
    assert job["size"] == 32 and job["num_images"] == 2 and job["seed"] == 1
    assert queued_jobs(broker) == [(TASK_GENERATE, [job["id"]])]
    row = session.get(GenerationJob, job["id"])
    assert row is not None and row.client_id == generator[0]
    assert row.input_key == f"inputs/{job['id']}.safetensors"
    assert "prompt_embeds" not in json.dumps(row.params)  # the embeddings are not in the DB
    stored = input_from_bytes(store.get_bytes(row.input_key))
    assert torch.equal(stored.prompt, prompt) and stored.negative is None


def test_raw_f16le_embeddings_a_negative_and_version_ids_are_accepted(
    api: TestClient,
    generator: tuple[int, str],
    published: dict[str, PublishedVersion],
    store: ObjectStore,
) -> None:
    version_id = published["cluster:1"].version_id
    body = request(
        prompt_embeds=raw_b64(tokens(1, length=8)),
        negative_embeds=raw_b64(tokens(2, length=8)),
        embeds_format="f16le",
        adapters=[{"adapter": str(version_id), "weight": 1.0}, {"adapter": "global", "weight": 0}],
    )

    response = post(api, generator[1], body)

    assert response.status_code == 202, response.text
    assert [a["version_id"] for a in response.json()["adapters"]] == [
        version_id,
        published["global"].version_id,
    ]
    stored = input_from_bytes(store.get_bytes(f"inputs/{response.json()['id']}.safetensors"))
    assert torch.equal(stored.prompt, tokens(1, length=8))
    assert stored.negative is not None and torch.equal(stored.negative, tokens(2, length=8))


def test_an_empty_mix_is_the_base_model(api: TestClient, generator: tuple[int, str]) -> None:
    response = post(api, generator[1], request(adapters=[]))

    assert response.status_code == 202, response.text
    assert response.json()["adapters"] == []


def header_b64(header: bytes) -> str:
    """A base64 'safetensors file' that is only this header."""
    return base64.b64encode(struct.pack("<Q", len(header)) + header).decode()


def entry_json(**fields: Any) -> bytes:
    entry = {"dtype": "F16", "shape": [16, 384], "data_offsets": [0, 12288], **fields}
    return json.dumps({"prompt_embeds": entry}).encode()


BAD_REQUESTS: dict[str, tuple[dict[str, Any], str]] = {
    "wrong width": ({"prompt_embeds": embeds_b64(tokens(width=100))}, "shape"),
    "wrong dtype": ({"prompt_embeds": embeds_b64(tokens().float())}, "dtype must be F16"),
    "two prompts": ({"prompt_embeds": embeds_b64(tokens().expand(2, -1, -1))}, "several"),
    "too many tokens": ({"prompt_embeds": embeds_b64(tokens(length=78))}, "78 tokens"),
    "wrong tensor name": ({"prompt_embeds": embeds_b64(tokens(), "tokens")}, "prompt_embeds"),
    "not safetensors": ({"prompt_embeds": "aGVsbG8gd29ybGQ="}, "not a safetensors"),
    "header nested thousands deep": (
        {"prompt_embeds": header_b64(b"[" * 5000 + b"]" * 5000)},
        "not a safetensors",
    ),
    "shape an integer": ({"prompt_embeds": header_b64(entry_json(shape=16))}, "not a safetensors"),
    "shape null": ({"prompt_embeds": header_b64(entry_json(shape=None))}, "not a safetensors"),
    "shape negative": (
        {"prompt_embeds": header_b64(entry_json(shape=[-16, 384]))},
        "not a safetensors",
    ),
    "not base64": ({"prompt_embeds": "%%%"}, "base64"),
    "raw length": ({"prompt_embeds": raw_b64(tokens())[:-8], "embeds_format": "f16le"}, "rows"),
    "nan embedding": (
        {"prompt_embeds": embeds_b64(torch.full((1, 4, 384), float("nan")).half())},
        "NaN",
    ),
    "negative length": (
        {"negative_embeds": embeds_b64(tokens(length=8))},
        "negative_embeds has 8 tokens",
    ),
    "unknown adapter": (
        {"adapters": [{"adapter": "cluster:9", "weight": 1}]},
        "adapters[0] is unknown: no published adapter has this name",
    ),
    "unknown version id": (
        {"adapters": [{"adapter": "987654", "weight": 1}]},
        "adapters[0] is unknown: no published version has this id",
    ),
    "version id past the range": (
        {"adapters": [{"adapter": 2**63, "weight": 1}]},
        "less than or equal to 2147483647",
    ),
    "version id digits past the range": (
        {"adapters": [{"adapter": str(2**63), "weight": 1}]},
        "a version id must be between 1 and 2147483647",
    ),
    "nan weight": ({"adapters": [{"adapter": "cluster:0", "weight": NAN}]}, "weight"),
    "infinite weight": ({"adapters": [{"adapter": "cluster:0", "weight": "__INF__"}]}, "weight"),
    "negative weight": ({"adapters": [{"adapter": "cluster:0", "weight": -0.5}]}, "weight"),
    "all weights zero": ({"adapters": [{"adapter": "cluster:0", "weight": 0}]}, "> 0"),
    "adapter twice": (
        {
            "adapters": [
                {"adapter": "cluster:0", "weight": 1},
                {"adapter": "cluster:0", "weight": 1},
            ]
        },
        "adapters[1] repeats an adapter listed before it",
    ),
    "nine adapters": (
        {"adapters": [{"adapter": f"cluster:{i}", "weight": 1} for i in range(9)]},
        "adapters",
    ),
    "subnormal temperature": (
        {"adapters": "auto", "temperature": 1e-320},
        "greater than or equal to 0.001",
    ),
    "zero steps": ({"steps": 0}, "steps"),
    "too many steps": ({"steps": 101}, "steps"),
    "too many images": ({"num_images": 9}, "num_images"),
    "no images": ({"num_images": 0}, "num_images"),
    "wrong size": ({"size": 64}, "draws 32"),
    "guidance too high": ({"guidance": 25}, "guidance"),
    "stop after the end": ({"stop_at_step": 4}, "stop_at_step"),
    "plaintext disabled": (
        {"prompt_embeds": None, "prompt": "a red circle"},
        "TESSERA_ALLOW_PLAINTEXT_PROMPTS=true",
    ),
    "both prompts": ({"prompt": "a red circle"}, "exactly one"),
    "auto without pooled": ({"adapters": "auto"}, "pooled"),
    "unknown field": ({"sampler": "euler"}, "sampler"),
}


@pytest.mark.usefixtures("published")
@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_input_is_refused_and_nothing_is_queued_or_stored(
    case: str,
    api: TestClient,
    generator: tuple[int, str],
    session: Session,
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    changes, expected = BAD_REQUESTS[case]

    response = post(api, generator[1], request(**changes))

    assert response.status_code == 422, response.text
    assert expected in response.text
    assert nothing_queued(session, store, broker)


@pytest.mark.usefixtures("published")
def test_tokens_and_roles_are_checked_before_anything_is_stored(
    api: TestClient, settings: Settings, session: Session, store: ObjectStore, broker: redis.Redis
) -> None:
    _, device = make_client(session, settings, Role.DEVICE)
    body = json.dumps(request())
    headers = {"Content-Type": "application/json"}

    missing = api.post("/v1/generations", content=body, headers=headers)
    invalid = api.post("/v1/generations", content=body, headers={**headers, **bearer("nope")})
    wrong_role = api.post("/v1/generations", content=body, headers={**headers, **bearer(device)})
    bootstrap = api.post(
        "/v1/generations",
        content=body,
        headers={**headers, **bearer(settings.operator_token.get_secret_value())},
    )

    assert missing.status_code == 401
    assert invalid.status_code == 401
    assert wrong_role.status_code == 403 and "generator" in wrong_role.text
    assert bootstrap.status_code == 403 and "enrol a client" in bootstrap.text
    assert nothing_queued(session, store, broker)


@pytest.mark.usefixtures("published")
def test_an_idempotency_key_returns_the_same_job(
    api: TestClient,
    generator: tuple[int, str],
    settings: Settings,
    session: Session,
    broker: redis.Redis,
) -> None:
    _, other_generator = make_client(session, settings, Role.GENERATOR)
    body = request(seed=None)  # the seed chosen for the first is kept for the replay

    first = post(api, generator[1], body, **{"Idempotency-Key": "order-42"})
    again = post(api, generator[1], body, **{"Idempotency-Key": "order-42"})
    changed = post(api, generator[1], request(steps=5), **{"Idempotency-Key": "order-42"})
    other_client = post(api, other_generator, body, **{"Idempotency-Key": "order-42"})
    too_long = post(api, generator[1], body, **{"Idempotency-Key": "k" * 129})

    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["seed"] == first.json()["seed"]
    assert changed.status_code == 409 and "different request" in changed.text
    assert other_client.status_code == 202 and other_client.json()["id"] != first.json()["id"]
    assert too_long.status_code == 422
    assert job_rows(session) == 2
    assert [args[0] for _, args in queued_jobs(broker)] == [
        first.json()["id"],
        other_client.json()["id"],
    ]


@pytest.mark.usefixtures("published")
def test_only_the_owner_or_an_operator_reads_a_job(
    api: TestClient, generator: tuple[int, str], settings: Settings, session: Session
) -> None:
    _, stranger = make_client(session, settings, Role.GENERATOR)
    job_id = post(api, generator[1], request()).json()["id"]
    operator = bearer(settings.operator_token.get_secret_value())

    own = api.get(f"/v1/generations/{job_id}", headers=bearer(generator[1]))
    by_operator = api.get(f"/v1/generations/{job_id}", headers=operator)
    by_stranger = api.get(f"/v1/generations/{job_id}", headers=bearer(stranger))
    unknown = api.get(f"/v1/generations/{uuid.uuid4()}", headers=operator)
    malformed = [
        api.get(f"/v1/generations/{bad}", headers=operator).status_code
        for bad in ("no-such-job", "%00" * 36, job_id.upper())
    ]
    unauthenticated = api.get(f"/v1/generations/{job_id}")

    assert own.status_code == 200 and own.json()["state"] == "queued"
    assert own.json()["result"] is None
    assert by_operator.status_code == 200
    assert by_stranger.status_code == 404
    assert unknown.status_code == 404
    assert malformed == [422] * 3  # before any database sees it (PostgreSQL refuses a NUL)
    assert unauthenticated.status_code == 401


@pytest.mark.usefixtures("published")
def test_plaintext_prompts_are_encoded_here_when_allowed(
    settings: Settings, generator: tuple[int, str], store: ObjectStore, session: Session
) -> None:
    from services.inference.api.submission import prompt_encoder

    allowed = settings.model_copy(update={"allow_plaintext_prompts": True})
    body = request(prompt_embeds=None, prompt="a red circle", negative_prompt="blurry")

    with TestClient(create_app(allowed)) as api:
        response = post(api, generator[1], body)

    assert response.status_code == 202, response.text
    row = session.get(GenerationJob, response.json()["id"])
    assert row is not None and row.params["plaintext"] is True
    assert "red circle" not in json.dumps(row.params)
    stored = input_from_bytes(store.get_bytes(row.input_key or ""))
    expected = prompt_encoder(settings.base_model).encode(["a red circle", "blurry"]).embeds
    assert torch.equal(stored.prompt, expected[0:1].half())
    assert stored.negative is not None and torch.equal(stored.negative, expected[1:2].half())


@pytest.fixture
def clustering_api(api: TestClient, settings: Settings) -> Iterator[TestClient]:
    """The real clustering app, in place of the inference API's HTTP client to it."""
    with TestClient(create_clustering_app(settings)) as client:
        api.app.state.clustering_http = client  # type: ignore[attr-defined]
        yield client


def _clustering(session: Session, centroids: dict[int, np.ndarray]) -> None:
    clustering = Clustering(version=1, algorithm="test")
    session.add(clustering)
    session.flush()
    for label, centroid in centroids.items():
        session.add(
            Cluster(
                clustering_id=clustering.id,
                label=label,
                centroid=task_vector_bytes(centroid.tolist()),
                size=1,
            )
        )
    session.commit()


@pytest.mark.usefixtures("clustering_api")
def test_auto_routes_the_pooled_vector_to_the_clusters_adapters(
    api: TestClient,
    generator: tuple[int, str],
    published: dict[str, PublishedVersion],
    session: Session,
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    axes = np.eye(384)
    _clustering(session, {0: axes[0], 1: axes[1], 2: axes[2]})  # cluster 2 has no adapter
    pooled = (0.8 * axes[0] + 0.55 * axes[1] + 0.2 * axes[2]).astype(np.float64)
    pooled /= np.linalg.norm(pooled)

    routed = post(api, generator[1], request(adapters="auto", pooled=pooled.tolist(), top_k=3))
    not_unit = post(api, generator[1], request(adapters="auto", pooled=(2 * pooled).tolist()))

    assert routed.status_code == 202, routed.text
    job = routed.json()
    weights = {a["adapter"]: a["weight"] for a in job["adapters"]}
    assert set(weights) == {"cluster:0", "cluster:1"}
    assert weights["cluster:0"] > weights["cluster:1"] > 0
    assert sum(weights.values()) == pytest.approx(1.0)
    assert job["routing"]["clustering_version"] == 1
    assert job["routing"]["without_adapter"] == [2]
    assert not_unit.status_code == 422 and "norm" in not_unit.text
    assert len(queued_jobs(broker)) == 1


@pytest.mark.usefixtures("clustering_api", "published")
def test_auto_before_any_clustering_is_a_conflict(
    api: TestClient,
    generator: tuple[int, str],
    session: Session,
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    pooled = np.eye(384)[0].tolist()

    response = post(api, generator[1], request(adapters="auto", pooled=pooled))

    assert response.status_code == 409 and "clustering" in response.text
    assert nothing_queued(session, store, broker)


def test_the_openapi_document_describes_the_embedding_format(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    operation = schema["paths"]["/v1/generations"]["post"]

    assert "f16le" in operation["description"] and "prompt_embeds" in operation["description"]
    assert {"202", "401", "403", "409", "422"} <= set(operation["responses"])


def test_a_body_over_the_request_limit_is_refused_before_it_is_read(
    api: TestClient,
    generator: tuple[int, str],
    settings: Settings,
    session: Session,
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    padding = "A" * (settings.max_request_bytes + 1)

    response = post(api, generator[1], request(prompt_embeds=padding))

    assert response.status_code == 413
    assert nothing_queued(session, store, broker)
