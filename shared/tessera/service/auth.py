"""Bearer-token authentication and role checks for every service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from tessera.models import Client, Role
from tessera.service.deps import SessionDep, SettingsDep
from tessera.tokens import hash_token, tokens_equal

_bearer = HTTPBearer(auto_error=False, description="A client token, or the operator token")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an enrolled client, or the bootstrap operator (client_id None)."""

    client_id: int | None
    name: str
    role: Role


BOOTSTRAP_OPERATOR = Principal(client_id=None, name="bootstrap-operator", role=Role.OPERATOR)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def authenticate(
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller behind the bearer token; 401 if it is missing, unknown or disabled."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    token = credentials.credentials
    if tokens_equal(token, settings.operator_token.get_secret_value()):
        return BOOTSTRAP_OPERATOR
    token_hash = hash_token(token, secret=settings.token_secret.get_secret_value())
    client = session.scalar(select(Client).where(Client.token_hash == token_hash))
    if client is None:
        raise _unauthorized("invalid bearer token")
    if client.disabled:
        raise _unauthorized(f"client {client.name!r} is disabled")
    return Principal(client_id=client.id, name=client.name, role=client.role)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require_role(*roles: Role) -> object:
    """A dependency that lets only callers with one of `roles` through (403 otherwise)."""
    allowed = ", ".join(role.value for role in roles)

    def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"this endpoint needs role {allowed}; the token is a {principal.role.value}",
            )
        return principal

    return Depends(check)


OperatorDep = Annotated[Principal, require_role(Role.OPERATOR)]
DeviceDep = Annotated[Principal, require_role(Role.DEVICE)]
GeneratorDep = Annotated[Principal, require_role(Role.GENERATOR, Role.OPERATOR)]
