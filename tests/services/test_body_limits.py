"""A body over its limit is a 413, and the connection it came on stays usable or closes cleanly.

The service runs under a real uvicorn server (HTTP/1.1 keep-alive is the server's, not the
test client's), on a small request limit so that the bodies stay small.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator

import pytest

from services.clustering.main import create_app
from tessera.config import Settings
from tessera.service.middleware import DRAIN_BYTES
from tests.serving import served

# A wall-clock bound: under pytest-xdist these modules run one at a time, on one worker.
pytestmark = pytest.mark.xdist_group("timed")

LIMIT = 64 * 1024


@pytest.fixture
def port(settings: Settings) -> Iterator[int]:
    """The clustering service under uvicorn in a thread, with a 64 KiB request limit."""
    app = create_app(settings.model_copy(update={"max_request_bytes": LIMIT}))
    with served(app) as url:
        yield int(url.rsplit(":", 1)[1])


def _json_over_limit() -> bytes:
    return json.dumps({"vector": [0.5] * (LIMIT // 4), "top_k": 1}).encode()


def _chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _post_then_get(port: int, **request: object) -> tuple[http.client.HTTPResponse, bytes, int]:
    """POST /v1/route, then GET /healthz on the same connection: (first answer, its body,
    status of the second); fails if the second went on another socket."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/v1/route", headers={"Content-Type": "application/json"}, **request)  # type: ignore[arg-type]
    first = connection.getresponse()
    body = first.read()
    socket_before = connection.sock
    connection.request("GET", "/healthz")
    second = connection.getresponse()
    second.read()
    assert connection.sock is socket_before, "the next request needed a new connection"
    connection.close()
    return first, body, second.status


def test_a_declared_body_over_the_limit_is_413_and_the_connection_serves_the_next_request(
    port: int,
) -> None:
    first, body, next_status = _post_then_get(port, body=_json_over_limit())

    assert first.status == 413
    assert json.loads(body) == {"detail": f"request body is larger than the limit of {LIMIT} bytes"}
    assert first.getheader("Connection") is None
    assert next_status == 200


def test_a_chunked_json_body_over_the_limit_is_413_not_400(port: int) -> None:
    first, body, next_status = _post_then_get(
        port, body=_chunks(_json_over_limit()), encode_chunked=True
    )

    assert first.status == 413
    assert "larger than the limit" in json.loads(body)["detail"]
    assert next_status == 200


def test_a_body_too_long_to_drain_gets_413_and_a_clean_close(port: int) -> None:
    declared = LIMIT + DRAIN_BYTES + 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(
            b"POST /v1/route HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % declared
        )
        started = time.monotonic()
        answer = b""
        while chunk := raw.recv(65536):  # ends with the server's FIN; a reset would raise
            answer += chunk

    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413")
    assert b"connection: close" in head
    assert time.monotonic() - started < 2
