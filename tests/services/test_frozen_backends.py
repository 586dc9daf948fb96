"""A backend that hangs (its process SIGSTOPped: connections are accepted, nothing answers) is
a 503 with Retry-After within a few seconds on the API paths, not after tens of seconds, and
requests succeed again once it resumes. PostgreSQL is shared with others: a proxy in front of a
scratch database of it stops forwarding instead."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from services.aggregator.main import create_app as create_aggregator
from services.inference.api.main import create_app as create_inference
from tessera import db
from tessera.config import Settings
from tessera.devstack import EmbeddedSeaweed, EmbeddedValkey
from tessera.lora import adapter_to_bytes, random_adapter
from tessera.model.base import BaseModel
from tessera.models import Role
from tessera.storage import QUICK_READ_TIMEOUT_S
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, fresh_postgres_database
from tests.helpers import bearer, enrol
from tests.services.inference.helpers import embeds_b64, make_client, tokens
from tests.tcp_proxy import TcpProxy

# Every answer while a backend is frozen comes within this many seconds: a read timeout and a
# reconnection's (about 4.7 s for a publish on an idle machine), and a busy shared machine's
# slack. Before, a hung Redis cost 15 s or more and a hung S3 40 s.
FROZEN_ANSWER_S = 12.0


@contextmanager
def frozen(process: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """The process (and its group) stopped with SIGSTOP until the block ends."""
    assert process is not None
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(process.pid, signal.SIGCONT)


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    """The answer and the seconds it took."""
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


def test_a_frozen_redis_is_a_quick_503_and_generations_resume_after_it(
    settings: Settings, session: Session, tmp_path: Path
) -> None:
    valkey = EmbeddedValkey(tmp_path / "valkey", persistent=False)
    own = settings.model_copy(update={"redis_url": valkey.start()})
    _, token = make_client(session, own, Role.GENERATOR)
    body = {"prompt_embeds": embeds_b64(tokens()), "adapters": [], "steps": 2, "seed": 1}
    try:
        with TestClient(create_inference(own)) as api:
            before = api.post("/v1/generations", json=body, headers=bearer(token))
            with frozen(valkey.process):
                during, during_s = _timed(
                    lambda: api.post("/v1/generations", json=body, headers=bearer(token))
                )
                ready, ready_s = _timed(lambda: api.get("/readyz"))
            after, after_s = _timed(
                lambda: api.post("/v1/generations", json=body, headers=bearer(token))
            )
    finally:
        valkey.stop()

    print(
        f"frozen Redis: POST /v1/generations 503 in {during_s:.1f} s, /readyz in {ready_s:.1f} s;"
        f" after SIGCONT 202 in {after_s:.1f} s"
    )
    assert before.status_code == 202, before.text
    assert during.status_code == 503
    assert during.headers["Retry-After"] == "5"
    assert during.json() == {"detail": "the job queue is unavailable; retry"}
    assert during_s < FROZEN_ANSWER_S, during_s
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("TimeoutError")
    assert ready.json()["checks"]["worker"] == "not checked: Redis does not answer"
    assert ready_s < FROZEN_ANSWER_S, ready_s
    assert after.status_code == 202, after.text


@pytest.mark.slow
def test_a_frozen_object_store_is_a_quick_503_and_uploads_resume_after_it(
    settings: Settings, base_model: BaseModel, tmp_path: Path
) -> None:
    seaweed = EmbeddedSeaweed(
        tmp_path / "seaweedfs",
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        bucket=settings.s3_bucket,
    )
    own = settings.model_copy(update={"s3_endpoint": seaweed.start()})
    operator = own.operator_token.get_secret_value()
    update = adapter_to_bytes(random_adapter(base_model.lora_spec, 4, 4.0, seed=1))
    try:
        with TestClient(create_aggregator(own)) as aggregator:
            round_id = aggregator.post(
                "/v1/rounds", json={"min_updates": 5}, headers=bearer(operator)
            ).json()["id"]
            device = enrol(aggregator, operator, "edge-frozen-s3")

            def put() -> httpx.Response:
                return aggregator.put(
                    f"/v1/rounds/{round_id}/updates/{device['id']}",
                    content=update,
                    params={"num_samples": 3},
                    headers={**bearer(device["token"]), "Content-Type": "application/octet-stream"},
                )

            before = put()
            with frozen(seaweed.process):
                during, during_s = _timed(put)
            after, after_s = _timed(put)
    finally:
        seaweed.stop()

    print(f"frozen S3: upload 503 in {during_s:.1f} s; after SIGCONT 200 in {after_s:.1f} s")
    assert before.status_code == 201, before.text
    assert during.status_code == 503
    assert during.headers["Retry-After"] == "5"
    assert during.json() == {"detail": "the object store is unavailable; retry after 5 s"}
    assert during_s < QUICK_READ_TIMEOUT_S + FROZEN_ANSWER_S / 2, during_s
    assert after.status_code == 200, after.text


def test_a_frozen_database_is_a_quick_503_and_requests_resume_after_it(
    settings: Settings, postgres_admin_url: str | None
) -> None:
    if postgres_admin_url is None:
        pytest.skip("PostgreSQL only (TESSERA_DATABASE_URL): an SQLite file cannot hang")
    with fresh_postgres_database(postgres_admin_url) as url:
        db.upgrade(url)
        server = make_url(url)
        with TcpProxy((server.host or "127.0.0.1", server.port or 5432)) as proxy:
            proxied = server.set(host="127.0.0.1", port=proxy.port)
            own = settings.model_copy(
                update={"database_url": proxied.render_as_string(hide_password=False)}
            )
            operator = bearer(own.operator_token.get_secret_value())
            with TestClient(create_aggregator(own)) as aggregator:
                before = aggregator.get("/v1/rounds", headers=operator)
                proxy.freeze()
                try:
                    during, during_s = _timed(
                        lambda: aggregator.get("/v1/rounds", headers=operator)
                    )
                    again, again_s = _timed(lambda: aggregator.get("/v1/rounds", headers=operator))
                    ready, ready_s = _timed(lambda: aggregator.get("/readyz"))
                finally:
                    proxy.thaw()
                after, after_s = _timed(lambda: aggregator.get("/v1/rounds", headers=operator))

    print(
        f"frozen PostgreSQL: GET /v1/rounds 503 in {during_s:.1f} s and {again_s:.1f} s, "
        f"/readyz in {ready_s:.1f} s; thawed, 200 in {after_s:.1f} s"
    )
    assert before.status_code == 200, before.text
    for answer, seconds in ((during, during_s), (again, again_s)):
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "5"
        assert answer.json() == {"detail": "the database is unavailable; retry after 5 s"}
        assert seconds < db.QUICK_DATABASE_TIMEOUT_S + db.CONNECT_TIMEOUT_S + 3, seconds
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("OperationalError")
    assert ready_s < FROZEN_ANSWER_S, ready_s
    assert after.status_code == 200, after.text
