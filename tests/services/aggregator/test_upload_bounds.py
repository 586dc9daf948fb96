"""Update uploads are bounded: a limit from the base model's largest valid update, a body
spooled once (not held twice in memory), and a read timeout for a body that stalls."""

from __future__ import annotations

import socket
import time
import tracemalloc
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from tessera.config import Settings
from tessera.lora import LoraSpec, adapter_to_bytes, random_adapter
from tessera.lora.files import largest_update_bytes
from tessera.storage import ObjectStore
from tests.helpers import bearer, enrol
from tests.services.aggregator.helpers import nothing_stored, open_round, upload
from tests.serving import served

# A wall-clock bound: under pytest-xdist these modules run one at a time, on one worker.
pytestmark = pytest.mark.xdist_group("timed")

MiB = 1024 * 1024


def test_the_default_limit_is_the_largest_valid_update(
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    settings: Settings,
    session: Session,
    store: ObjectStore,
) -> None:
    assert settings.max_upload_bytes is None
    limit = largest_update_bytes(spec)
    largest = adapter_to_bytes(random_adapter(spec, spec.max_rank, 1.0, seed=3), dtype="float32")
    round_ = open_round(aggregator, operator)

    accepted = upload(aggregator, device["token"], round_["id"], device["id"], largest)
    over = upload(aggregator, device["token"], round_["id"], device["id"], b"x" * (limit + 1))

    assert len(largest) <= limit < len(largest) + 256 * 1024  # the file plus header room
    assert limit < 64 * MiB // 4  # far below the old fixed 64 MiB for the bundled model
    assert accepted.status_code == 201, accepted.text
    assert over.status_code == 413
    assert f"limit of {limit} bytes" in over.json()["detail"]


@pytest.fixture
def served_aggregator(settings: Settings) -> Iterator[str]:
    limits = {"body_read_timeout_s": 0.5, "max_upload_bytes": 16 * MiB}
    with served(create_app(settings.model_copy(update=limits))) as url:
        yield url


def _device_and_round(url: str, operator_token: str) -> tuple[dict, int]:
    with httpx.Client(base_url=url) as http:
        device = enrol(http, operator_token, "edge-slow")  # type: ignore[arg-type]
        round_ = http.post("/v1/rounds", json={}, headers=bearer(operator_token))
        assert round_.status_code == 201, round_.text
    return device, round_.json()["id"]


def _stalled_answer(url: str, head: str) -> tuple[bytes, float]:
    """Send `head` and 100 bytes of a 5000-byte body, then nothing: the answer (read until the
    server closes the connection) and how long it took."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"x" * 100)
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer, time.monotonic() - started


@pytest.mark.parametrize("body", ["update", "json"])
def test_a_body_that_stalls_is_refused_after_the_read_timeout(
    body: str, served_aggregator: str, operator_token: str, session: Session, store: ObjectStore
) -> None:
    device, round_id = _device_and_round(served_aggregator, operator_token)
    if body == "update":
        request = f"PUT /v1/rounds/{round_id}/updates/{device['id']}?num_samples=4"
        token, content_type = device["token"], "application/octet-stream"
    else:
        request, token, content_type = "POST /v1/rounds", operator_token, "application/json"
    head = (
        f"{request} HTTP/1.1\r\nHost: tessera\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 5000\r\n\r\n"
    )

    answer, waited = _stalled_answer(served_aggregator, head)

    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"TESSERA_BODY_READ_TIMEOUT_S" in answer
    assert b"connection: close" in answer.lower()  # and the server did close it
    assert 0.4 < waited < 5
    assert nothing_stored(session, store, round_id, device["id"])
    if body == "json":
        rounds = httpx.get(f"{served_aggregator}/v1/rounds", headers=bearer(operator_token))
        assert len(rounds.json()) == 1  # only the round made before


def test_an_upload_is_held_in_memory_once(
    served_aggregator: str, operator_token: str, session: Session, store: ObjectStore
) -> None:
    device, round_id = _device_and_round(served_aggregator, operator_token)
    size, piece = 8 * MiB, b"x" * (64 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece  # the same object: the client holds 64 KiB

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        response = httpx.put(
            f"{served_aggregator}/v1/rounds/{round_id}/updates/{device['id']}",
            params={"num_samples": 4},
            content=body(),
            headers={**bearer(device["token"]), "Content-Type": "application/octet-stream"},
            timeout=60,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response.status_code == 422, response.text  # read whole, then refused as no file
    assert peak < 1.5 * size, f"peak {peak / MiB:.1f} MiB for an {size // MiB} MiB body"
    assert nothing_stored(session, store, round_id, device["id"])


@pytest.fixture
def patient_aggregator(settings: Settings) -> Iterator[str]:
    """An aggregator that waits 3 s for a stalled body."""
    limits = {"body_read_timeout_s": 3.0, "max_upload_bytes": 16 * MiB}
    with served(create_app(settings.model_copy(update=limits))) as url:
        yield url


def test_a_device_sends_at_most_two_uploads_at_once(
    patient_aggregator: str, operator_token: str
) -> None:
    url = patient_aggregator
    device, round_id = _device_and_round(url, operator_token)
    host, port = url.removeprefix("http://").split(":")
    path = f"/v1/rounds/{round_id}/updates/{device['id']}?num_samples=4"
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: tessera\r\nAuthorization: Bearer {device['token']}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 5000\r\n\r\n"
    )
    headers = {**bearer(device["token"]), "Content-Type": "application/octet-stream"}
    slow = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
    try:
        for sock in slow:
            sock.sendall(head.encode() + b"x" * 100)  # two bodies still arriving
        time.sleep(0.5)
        third = httpx.put(f"{url}{path}", content=b"x" * 100, headers=headers, timeout=10)
        answers = [sock.recv(4096) for sock in slow]  # their 408s, after 3 s
    finally:
        for sock in slow:
            sock.close()
    after = httpx.put(f"{url}{path}", content=b"x" * 100, headers=headers, timeout=10)

    assert third.status_code == 429, third.text
    assert third.headers["retry-after"] == "5"
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers
    assert after.status_code == 422  # the slots were given back: read, then refused as no file
