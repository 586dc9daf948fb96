"""Bearer-token authentication and role checks for every service.

A token is looked up on a session of its own, closed before the handler runs: a request never
holds a pooled database connection while it waits (for its body, a worker thread or a stream).

Service tokens (`tessera.tokens.service_token`) pass only where a route names their scope
(`require_role(..., scope=...)`); everywhere else, including `PrincipalDep`, they are 403.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from tessera.config import Settings
from tessera.models import Client, Role
from tessera.service.deps import ResourcesDep
from tessera.tokens import ServiceScope, hash_token, service_scope, service_token, tokens_equal

_bearer = HTTPBearer(auto_error=False, description="A client token, or the operator token")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an enrolled client, the bootstrap operator (client_id None), or another
    service with a scoped token (role None, `scope` set)."""

    client_id: int | None
    name: str
    role: Role | None
    scope: ServiceScope | None = None


BOOTSTRAP_OPERATOR = Principal(client_id=None, name="bootstrap-operator", role=Role.OPERATOR)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def identify(resources: ResourcesDep, credentials: Credentials) -> Principal:
    """The caller behind the bearer token, services included; 401 if it is missing, unknown
    or disabled. The lookup's session is closed at once (see the module's docstring)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    with resources.sessions() as session:
        return principal_for_token(
            settings=resources.settings, session=session, token=credentials.credentials
        )


def principal_for_token(*, settings: Settings, session: Session, token: str) -> Principal:
    """The caller a token stands for (the console's sign-in asks too); 401 if it is unknown
    or its client is disabled."""
    if tokens_equal(token, settings.operator_token.get_secret_value()):
        return BOOTSTRAP_OPERATOR
    secret = settings.token_secret.get_secret_value()
    scope = service_scope(token, secret=secret)
    if scope is not None:
        return Principal(client_id=None, name=f"service:{scope.value}", role=None, scope=scope)
    token_hash = hash_token(token, secret=secret)
    client = session.scalar(select(Client).where(Client.token_hash == token_hash))
    if client is None:
        raise _unauthorized("invalid bearer token")
    if client.disabled:
        raise _unauthorized(f"client {client.name!r} is disabled")
    return Principal(client_id=client.id, name=client.name, role=client.role)


CallerDep = Annotated[Principal, Depends(identify)]


def _service_refused(principal: Principal) -> HTTPException:
    scope = principal.scope.value if principal.scope else ""
    return HTTPException(
        status.HTTP_403_FORBIDDEN,
        detail=f"a service token of scope {scope} is not accepted on this endpoint",
    )


def authenticate(caller: CallerDep) -> Principal:
    """An enrolled client or the bootstrap operator; a service token is 403 here."""
    if caller.role is None:
        raise _service_refused(caller)
    return caller


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require_role(*roles: Role, scope: ServiceScope | None = None) -> object:
    """A dependency that lets only callers with one of `roles` through, or a service token
    of `scope` (403 otherwise)."""
    allowed = ", ".join(role.value for role in roles)

    def check(caller: CallerDep) -> Principal:
        if scope is not None and caller.scope is scope:
            return caller
        if caller.role is None:
            raise _service_refused(caller)
        if caller.role not in roles:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"this endpoint needs role {allowed}; the token is a {caller.role.value}",
            )
        return caller

    return Depends(check)


OperatorDep = Annotated[Principal, require_role(Role.OPERATOR)]
DeviceDep = Annotated[Principal, require_role(Role.DEVICE)]
GeneratorDep = Annotated[Principal, require_role(Role.GENERATOR, Role.OPERATOR)]
AssignerDep = Annotated[Principal, require_role(Role.OPERATOR, scope=ServiceScope.ASSIGN)]
RouterDep = Annotated[
    Principal,
    require_role(Role.DEVICE, Role.GENERATOR, Role.OPERATOR, scope=ServiceScope.ROUTE),
]


def service_headers(settings: Settings, scope: ServiceScope) -> dict[str, str]:
    """The Authorization header of a call to another service under `scope`."""
    token = service_token(scope, secret=settings.token_secret.get_secret_value())
    return {"Authorization": f"Bearer {token}"}
