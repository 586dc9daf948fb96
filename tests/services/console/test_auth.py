"""The console lets operators in only: sign-in form, signed cookie, CSRF on every post."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.aggregator.main import create_app
from services.console.session import COOKIE_NAME, SIGNIN_COOKIE_NAME, decode_session
from tessera.config import Settings
from tessera.models import Round
from tests.helpers import bearer, enrol
from tests.services.console.conftest import ServedStack, csrf_of, sign_in, signed_in_csrf
from tests.serving import served


def test_pages_redirect_to_sign_in_without_a_session(aggregator: TestClient) -> None:
    for path in ("/console/", "/console/services", "/console/rounds", "/console/clusters"):
        response = aggregator.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"] == "/console/signin"
    polled = aggregator.get("/console/", headers={"HX-Request": "true"}, follow_redirects=False)
    assert polled.headers["HX-Redirect"] == "/console/signin"


def test_operator_signs_in_with_a_post_and_gets_a_strict_httponly_cookie(
    aggregator: TestClient, operator_token: str, settings: Settings
) -> None:
    response = sign_in(aggregator, operator_token)

    assert response.status_code == 303
    assert response.headers["location"] == "/console/"
    assert operator_token not in response.headers["location"]
    cookie = next(
        h for h in response.headers.get_list("set-cookie") if h.startswith(f"{COOKIE_NAME}=")
    )
    attributes = cookie.lower()
    assert "httponly" in attributes and "samesite=strict" in attributes
    assert "path=/console" in attributes and "max-age=28800" in attributes
    assert operator_token not in cookie
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    secret = settings.token_secret.get_secret_value()
    assert decode_session(value, token_secret=secret) is not None
    page = aggregator.get("/console/")
    assert page.status_code == 200 and "<h1>Overview</h1>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_wrong_token_is_refused_and_sets_no_session(
    aggregator: TestClient, operator_token: str
) -> None:
    response = sign_in(aggregator, operator_token + "x")

    assert response.status_code == 401
    assert "this token is not valid" in response.text
    assert COOKIE_NAME not in aggregator.cookies
    assert aggregator.get("/console/", follow_redirects=False).status_code == 303


def test_device_and_generator_tokens_cannot_enter(
    aggregator: TestClient, operator_token: str
) -> None:
    for role in ("device", "generator"):
        client = enrol(aggregator, operator_token, f"not-an-operator-{role}", role=role)
        response = sign_in(aggregator, client["token"])
        assert response.status_code == 403, role
        assert f"this token belongs to a {role}" in response.text
        assert COOKIE_NAME not in aggregator.cookies


def test_sign_in_without_the_forms_nonce_is_refused(
    aggregator: TestClient, operator_token: str
) -> None:
    response = aggregator.post(
        "/console/signin", data={"token": operator_token, "csrf": "forged"}, follow_redirects=False
    )
    assert response.status_code == 403
    assert COOKIE_NAME not in aggregator.cookies


def test_a_forged_or_expired_cookie_is_no_session(
    aggregator: TestClient, operator_token: str, settings: Settings
) -> None:
    sign_in(aggregator, operator_token)
    value = aggregator.cookies[COOKIE_NAME]
    body, _, signature = value.partition(".")
    aggregator.cookies.clear()
    aggregator.cookies.set(COOKIE_NAME, f"{body}x.{signature}")
    assert aggregator.get("/console/", follow_redirects=False).status_code == 303
    secret = settings.token_secret.get_secret_value()
    assert decode_session(value, token_secret=secret, now=4_000_000_000) is None


def test_state_changing_forms_need_the_csrf_token(
    aggregator: TestClient, operator_token: str, session: Session
) -> None:
    sign_in(aggregator, operator_token)
    csrf = signed_in_csrf(aggregator)

    missing = aggregator.post("/console/rounds", data={"min_updates": "1"}, follow_redirects=False)
    wrong = aggregator.post(
        "/console/rounds", data={"min_updates": "1", "csrf": csrf[::-1]}, follow_redirects=False
    )
    signout = aggregator.post("/console/signout", follow_redirects=False)

    assert missing.status_code == 403 and "CSRF" in missing.json()["detail"]
    assert wrong.status_code == 403
    assert signout.status_code == 403
    assert session.scalars(select(Round)).all() == []
    opened = aggregator.post(
        "/console/rounds", data={"min_updates": "1", "csrf": csrf}, follow_redirects=False
    )
    assert opened.status_code == 303
    assert [r.number for r in session.scalars(select(Round))] == [1]


def test_sign_out_ends_the_session(aggregator: TestClient, operator_token: str) -> None:
    sign_in(aggregator, operator_token)
    csrf = signed_in_csrf(aggregator)
    response = aggregator.post("/console/signout", data={"csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    assert COOKIE_NAME not in aggregator.cookies
    assert aggregator.get("/console/", follow_redirects=False).status_code == 303


def test_an_enrolled_operator_is_out_once_disabled(
    aggregator: TestClient, operator_token: str
) -> None:
    other = enrol(aggregator, operator_token, "ops-2", role="operator")
    assert sign_in(aggregator, other["token"]).status_code == 303
    assert aggregator.get("/console/").status_code == 200
    patched = aggregator.patch(
        f"/v1/clients/{other['id']}", json={"disabled": True}, headers=bearer(operator_token)
    )
    assert patched.status_code == 200
    assert aggregator.get("/console/", follow_redirects=False).status_code == 303


def test_token_never_in_a_url_or_the_access_log(
    served_aggregator: ServedStack, operator_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=served_aggregator.url, timeout=10) as client:
        response = sign_in(client, operator_token)
        assert response.status_code == 303
        followed = client.get(response.headers["location"])
        assert followed.status_code == 200
        wrong = sign_in(client, operator_token + "x")
        assert wrong.status_code == 401
        urls = [str(r.url) for r in (response, followed, wrong)] + [
            r.headers.get("location", "") for r in (response, followed, wrong)
        ]

    access = [r for r in caplog.records if r.name == "uvicorn.access"]
    assert any("/console/signin" in r.getMessage() for r in access), "no access log was written"
    assert all(operator_token not in url for url in urls)
    assert all(operator_token not in record.getMessage() for record in caplog.records)
    assert all(operator_token not in str(record.args) for record in caplog.records)


def _secure_cookies(url: str, token: str, headers: dict[str, str]) -> dict[str, bool]:
    """Sign in over plain HTTP with `headers` on both requests; whether each cookie set on the
    way is Secure. (The nonce is sent by hand: a client's jar keeps a Secure cookie off HTTP.)"""
    secure: dict[str, bool] = {}
    with httpx.Client(base_url=url, timeout=10) as client:
        form = client.get("/console/signin", headers=headers)
        client.cookies.clear()
        nonce = form.cookies[SIGNIN_COOKIE_NAME]
        signed_in = client.post(
            "/console/signin",
            data={"token": token, "csrf": csrf_of(form.text)},
            headers={**headers, "Cookie": f"{SIGNIN_COOKIE_NAME}={nonce}"},
        )
        assert signed_in.status_code == 303, signed_in.text
        for response in (form, signed_in):
            for header in response.headers.get_list("set-cookie"):
                name = header.split("=", 1)[0]
                if name == SIGNIN_COOKIE_NAME and response is signed_in:
                    continue  # its deletion
                attributes = {part.strip().lower() for part in header.split(";")[1:]}
                secure[name] = "secure" in attributes
    assert set(secure) == {SIGNIN_COOKIE_NAME, COOKIE_NAME}
    return secure


HTTPS_PROXIED = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}


@pytest.mark.parametrize(
    ("setting", "trusted", "headers", "secure"),
    [
        (None, "127.0.0.1", {}, False),  # plain HTTP, no proxy
        (None, "127.0.0.1", HTTPS_PROXIED, True),  # a TLS proxy uvicorn trusts (its default)
        (None, "192.0.2.1", HTTPS_PROXIED, False),  # a peer uvicorn does not trust: not believed
        (True, "192.0.2.1", {}, True),  # behind a TLS ingress uvicorn cannot tell: the setting
        (False, "127.0.0.1", HTTPS_PROXIED, False),
    ],
)
def test_cookies_are_secure_behind_a_tls_proxy(
    settings: Settings,
    operator_token: str,
    setting: bool | None,
    trusted: str,
    headers: dict[str, str],
    secure: bool,
) -> None:
    own = settings.model_copy(update={"console_secure_cookie": setting})
    with served(create_app(own), forwarded_allow_ips=trusted) as url:
        cookies = _secure_cookies(url, operator_token, headers)

    assert cookies == {SIGNIN_COOKIE_NAME: secure, COOKIE_NAME: secure}
