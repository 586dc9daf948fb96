"""Who is signed in to the console: the session cookie checked on every request, CSRF on posts."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Form, HTTPException, Request, status

from services.console.session import COOKIE_NAME, ConsoleSession, csrf_valid, decode_session
from tessera.models import Client, Role
from tessera.service.deps import SessionDep, SettingsDep

SIGNIN_PATH = "/console/signin"


class SignInRequired(Exception):
    """No valid session: the handler answers with a redirect to the sign-in page."""


def current_operator(
    request: Request, settings: SettingsDep, session: SessionDep
) -> ConsoleSession:
    """The signed-in operator; re-checked against the database (a disabled client is out)."""
    value = request.cookies.get(COOKIE_NAME)
    secret = settings.token_secret.get_secret_value()
    console_session = None if value is None else decode_session(value, token_secret=secret)
    if console_session is None:
        raise SignInRequired
    if console_session.client_id is not None:
        client = session.get(Client, console_session.client_id)
        if client is None or client.disabled or client.role != Role.OPERATOR:
            raise SignInRequired
    return console_session


OperatorSessionDep = Annotated[ConsoleSession, Depends(current_operator)]


def check_csrf(
    request: Request,
    operator: OperatorSessionDep,
    settings: SettingsDep,
    csrf: Annotated[str | None, Form()] = None,
) -> ConsoleSession:
    """Every state-changing form carries the session's CSRF token (403 otherwise)."""
    candidate = csrf or request.headers.get("X-CSRF-Token")
    if not csrf_valid(
        operator.sid, candidate, token_secret=settings.token_secret.get_secret_value()
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="missing or wrong CSRF token: reload the page and submit the form again",
        )
    return operator


CsrfOperatorDep = Annotated[ConsoleSession, Depends(check_csrf)]
