"""Bearer tokens: generated at random, stored only as an HMAC-SHA256 under the token secret."""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_PREFIX = "tsr_"


def new_token() -> str:
    """A fresh bearer token (256 random bits), shown to its owner once."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str, *, secret: str) -> str:
    """The stored form of a token: hex HMAC-SHA256, so a database leak reveals no token."""
    return hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
