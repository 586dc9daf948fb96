"""Fixtures of the console: the aggregator served by a real uvicorn, sign-in helpers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient

from services.aggregator.main import create_app
from services.clustering.main import create_app as create_clustering_app
from services.console.session import COOKIE_NAME
from services.inference.api.main import create_app as create_inference_app
from tessera.config import Settings
from tests.serving import served

CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = CSRF_FIELD.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


def sign_in(client: TestClient | httpx.Client, token: str) -> httpx.Response:
    """Fill in and post the sign-in form as a browser would (its nonce cookie included)."""
    form = client.get("/console/signin")
    assert form.status_code == 200
    return client.post(
        "/console/signin",
        data={"token": token, "csrf": csrf_of(form.text)},
        follow_redirects=False,
    )


def signed_in_csrf(client: TestClient | httpx.Client) -> str:
    assert client.cookies.get(COOKIE_NAME)
    return csrf_of(client.get("/console/rounds").text)


@dataclass
class ServedStack:
    """An aggregator (console mounted) served over HTTP by uvicorn in a thread."""

    url: str
    settings: Settings


@pytest.fixture
def served_aggregator(settings: Settings) -> Iterator[ServedStack]:
    """The aggregator over HTTP with uvicorn's access log on (as an operator might run it)."""
    app = create_app(settings)
    with served(app, access_log=True, log_level="info", log_config=None) as url:
        yield ServedStack(url=url, settings=settings)


CONSOLE_QUEUE_DB = 5  # the jobs queued here are never run: no worker listens on this database


def console_over_inference(settings: Settings) -> Iterator[TestClient]:
    """The aggregator (the console mounted) whose inference client is the real inference app,
    whose clustering client is the real clustering app (both in-process)."""
    with (
        TestClient(create_app(settings)) as console,
        TestClient(create_inference_app(settings)) as inference,
        TestClient(create_clustering_app(settings)) as clustering,
    ):
        console.app.state.console_inference_http = inference  # type: ignore[attr-defined]
        inference.app.state.clustering_http = clustering  # type: ignore[attr-defined]
        yield console
