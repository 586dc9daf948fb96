"""Generation quotas: a cap per client and on the whole queue, 429 with Retry-After, and one
client at its cap leaves room for the others."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from services.inference.api.main import create_app
from tessera.config import Settings
from tessera.models import JobState, Role
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.inference.helpers import embeds_b64, job_rows, make_client, queued_jobs, tokens


@pytest.fixture
def capped(settings: Settings, store: ObjectStore) -> Iterator[TestClient]:
    """The inference API with 2 jobs per client and 3 in the queue."""
    limits = {"generation_jobs_per_client": 2, "generation_queue_cap": 3}
    with TestClient(create_app(settings.model_copy(update=limits))) as client:
        yield client


def _post(api: TestClient, token: str, seed: int, key: str | None = None):
    body = {"prompt_embeds": embeds_b64(tokens(seed)), "adapters": [], "steps": 2, "seed": seed}
    headers = bearer(token) | ({"Idempotency-Key": key} if key else {})
    return api.post("/v1/generations", json=body, headers=headers)


def test_a_client_at_its_cap_gets_429_and_the_others_still_get_in(
    capped: TestClient,
    settings: Settings,
    session: Session,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    broker: redis.Redis,
) -> None:
    (_, greedy), (_, other), (_, third) = (
        make_client(session, settings, Role.GENERATOR) for _ in range(3)
    )

    first = [_post(capped, greedy, seed, key=f"k{seed}") for seed in (1, 2)]
    refused = _post(capped, greedy, 3)
    replay = _post(capped, greedy, 1, key="k1")  # a replay is not a new job
    others = _post(capped, other, 4)
    full = _post(capped, third, 5)

    assert [a.status_code for a in first] == [202, 202]
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "10"
    assert "TESSERA_GENERATION_JOBS_PER_CLIENT" in refused.json()["detail"]
    assert replay.status_code == 200 and replay.json()["id"] == first[0].json()["id"]
    assert others.status_code == 202
    assert full.status_code == 429 and "TESSERA_GENERATION_QUEUE_CAP" in full.json()["detail"]
    assert job_rows(session) == 3 and len(store.list_keys("inputs/")) == 3
    assert len(queued_jobs(broker)) == 3  # the refused ones stored and queued nothing

    # A job that ends frees its client's place (and the queue's).
    with sessions() as own:
        crud.finish_job(session=own, job_id=first[0].json()["id"], state=JobState.SUCCEEDED)
    assert _post(capped, greedy, 6).status_code == 202
    assert _post(capped, third, 7).status_code == 429  # the queue is full again
