"""The console's signed session cookie and its CSRF tokens (no server-side session store).

A session is `base64(json).hmac`: who signed in, a random id, and when it expires. Its key is
derived from `TESSERA_TOKEN_SECRET`, so rotating that secret signs every operator out. The CSRF
token of a form is an HMAC of the session id: a page from another origin can neither read the
cookie (HttpOnly, SameSite=Strict) nor compute the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

COOKIE_NAME = "tessera_console"
SIGNIN_COOKIE_NAME = "tessera_console_signin"  # CSRF of the sign-in form itself
SESSION_LIFETIME_S = 8 * 3600
SIGNIN_LIFETIME_S = 600


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    """A signed-in operator: client id (None for the bootstrap operator), name, expiry."""

    sid: str
    client_id: int | None
    name: str
    expires_at: int


def _key(token_secret: str, purpose: str) -> bytes:
    return hmac.new(
        token_secret.encode(), f"tessera-console:{purpose}".encode(), hashlib.sha256
    ).digest()


def _sign(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def new_session(*, client_id: int | None, name: str, now: float | None = None) -> ConsoleSession:
    now = time.time() if now is None else now
    return ConsoleSession(
        sid=secrets.token_urlsafe(18),
        client_id=client_id,
        name=name,
        expires_at=int(now) + SESSION_LIFETIME_S,
    )


def encode_session(session: ConsoleSession, *, token_secret: str) -> str:
    payload = json.dumps(
        {
            "sid": session.sid,
            "cid": session.client_id,
            "name": session.name,
            "exp": session.expires_at,
        },
        separators=(",", ":"),
    ).encode()
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_sign(_key(token_secret, 'session'), body.encode())}"


def decode_session(
    value: str, *, token_secret: str, now: float | None = None
) -> ConsoleSession | None:
    """The session in a cookie value; None when it is malformed, forged or expired."""
    body, _, signature = value.partition(".")
    expected = _sign(_key(token_secret, "session"), body.encode())
    if not signature or not hmac.compare_digest(signature, expected):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        session = ConsoleSession(
            sid=str(data["sid"]),
            client_id=None if data["cid"] is None else int(data["cid"]),
            name=str(data["name"]),
            expires_at=int(data["exp"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
    if session.expires_at <= (time.time() if now is None else now):
        return None
    return session


def csrf_token(sid: str, *, token_secret: str) -> str:
    """The CSRF token of every form of the session `sid`."""
    return _sign(_key(token_secret, "csrf"), sid.encode())


def csrf_valid(sid: str, candidate: str | None, *, token_secret: str) -> bool:
    return bool(candidate) and hmac.compare_digest(
        str(candidate), csrf_token(sid, token_secret=token_secret)
    )


def new_signin_nonce() -> str:
    """The random value the sign-in form and its cookie must both carry (double submit)."""
    return secrets.token_urlsafe(18)
