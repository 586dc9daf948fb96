"""Bearer tokens: generated at random, stored only as an HMAC-SHA256 under the token secret;
and scoped service tokens, derived from that secret, for calls between services."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import StrEnum

TOKEN_PREFIX = "tsr_"


def new_token() -> str:
    """A fresh bearer token (256 random bits), shown to its owner once."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str, *, secret: str) -> str:
    """The stored form of a token: hex HMAC-SHA256, so a database leak reveals no token."""
    return hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


SERVICE_PREFIX = "tsvc_"


class ServiceScope(StrEnum):
    """What one service may ask of another: each call between services has its own scope."""

    ASSIGN = "clustering.assign"  # the aggregator asks the clustering service to assign a device
    ROUTE = "clustering.route"  # the inference API asks it to route a prompt to clusters


def service_token(scope: ServiceScope, *, secret: str) -> str:
    """The bearer token of one scope: an HMAC of the scope under the token secret, so every
    service holding the secret derives it and none is stored or configured on its own."""
    digest = hmac.new(secret.encode(), f"service:{scope.value}".encode(), hashlib.sha256)
    return f"{SERVICE_PREFIX}{scope.value}_{digest.hexdigest()}"


def service_scope(token: str, *, secret: str) -> ServiceScope | None:
    """The scope a service token carries, or None if `token` is not a valid one."""
    if not token.startswith(SERVICE_PREFIX):
        return None
    for scope in ServiceScope:
        if tokens_equal(token, service_token(scope, secret=secret)):
            return scope
    return None
