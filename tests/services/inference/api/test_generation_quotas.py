"""Generation quotas: a cap per client and on the whole queue, a quota per client over a time
window (429 with Retry-After), one client at its cap leaves room for the others, and workers
take queued jobs round robin between clients."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from services.inference.api.main import create_app
from tessera.config import Settings
from tessera.models import GenerationJob, JobState, Role, utcnow
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


def test_a_client_past_its_quota_waits_until_its_oldest_job_leaves_the_window(
    settings: Settings,
    session: Session,
    sessions: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    quota = {"generation_quota": 2, "generation_quota_window_s": 600}
    (_, busy), (_, other) = (make_client(session, settings, Role.GENERATOR) for _ in range(2))
    with TestClient(create_app(settings.model_copy(update=quota))) as api:
        first = [_post(api, busy, seed) for seed in (1, 2)]
        with sessions() as own:  # finished jobs count against a quota, not against the cap
            for response in first:
                crud.finish_job(session=own, job_id=response.json()["id"], state=JobState.SUCCEEDED)
        refused = _post(api, busy, 3)
        others = _post(api, other, 4)
        with sessions() as own:  # the first job was submitted 10 minutes ago
            job = own.get_one(GenerationJob, first[0].json()["id"])
            job.created_at = utcnow() - timedelta(seconds=600)
            own.commit()
        later = _post(api, busy, 5)

    assert [a.status_code for a in first] == [202, 202]
    assert refused.status_code == 429
    assert 590 <= int(refused.headers["retry-after"]) <= 600
    assert "TESSERA_GENERATION_QUOTA" in refused.json()["detail"]
    assert others.status_code == 202
    assert later.status_code == 202
    assert job_rows(session) == 4 and len(store.list_keys("inputs/")) == 4


def test_workers_take_queued_jobs_round_robin_between_clients(
    api: TestClient, settings: Settings, session: Session, sessions: sessionmaker[Session]
) -> None:
    (_, greedy), (_, patient), (_, late) = (
        make_client(session, settings, Role.GENERATOR) for _ in range(3)
    )
    names = {}
    for name, token, seed in [
        ("greedy 1", greedy, 1),
        ("greedy 2", greedy, 2),
        ("greedy 3", greedy, 3),
        ("greedy 4", greedy, 4),
        ("patient 1", patient, 5),
        ("patient 2", patient, 6),
        ("late 1", late, 7),
    ]:
        response = _post(api, token, seed)
        assert response.status_code == 202, response.text
        names[response.json()["id"]] = name

    order = []
    with sessions() as own:
        while (job_id := crud.next_fair_job(session=own)) is not None:
            assert crud.claim_job(session=own, job_id=job_id, total_steps=2)  # a worker takes it
            order.append(names[job_id])

    # Never served first, then the client served longest ago; each client's jobs oldest first.
    assert order == [
        "greedy 1",
        "patient 1",
        "late 1",
        "greedy 2",
        "patient 2",
        "greedy 3",
        "greedy 4",
    ]
