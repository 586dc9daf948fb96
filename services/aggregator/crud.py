"""Database operations of the aggregator, as keyword-only functions over a session."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from tessera.models import Client, Role, utcnow
from tessera.tokens import hash_token, new_token


class NameTakenError(Exception):
    pass


def create_client(
    *, session: Session, name: str, role: Role, token_secret: str
) -> tuple[Client, str]:
    """Enrol a client; return it with its token, which is stored only as a hash."""
    if session.scalar(select(Client.id).where(Client.name == name)) is not None:
        raise NameTakenError(f"a client named {name!r} already exists")
    token = new_token()
    client = Client(name=name, role=role, token_hash=hash_token(token, secret=token_secret))
    session.add(client)
    session.flush()
    return client, token


def rotate_token(*, session: Session, client: Client, token_secret: str) -> str:
    """Replace a client's token; the old one stops working at once."""
    token = new_token()
    client.token_hash = hash_token(token, secret=token_secret)
    session.flush()
    return token


def set_disabled(*, session: Session, client: Client, disabled: bool) -> Client:
    if disabled and client.disabled_at is None:
        client.disabled_at = utcnow()
    elif not disabled:
        client.disabled_at = None
    session.flush()
    return client


def list_clients(*, session: Session, role: Role | None = None) -> list[Client]:
    query = select(Client).order_by(Client.id)
    if role is not None:
        query = query.where(Client.role == role)
    return list(session.scalars(query))
