"""Database operations of the aggregator, as keyword-only functions over a session."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from tessera.federation import RoundConfig, task_vector_bytes
from tessera.models import (
    Adapter,
    AdapterVersion,
    Assignment,
    Client,
    Cluster,
    Clustering,
    Role,
    Round,
    RoundState,
    TaskEmbedding,
    Update,
    UpdateStatus,
    utcnow,
)
from tessera.storage import StoredObject
from tessera.tokens import hash_token, new_token


class NameTakenError(Exception):
    pass


class RoundConflictError(Exception):
    """Another round is collecting, or took the same number concurrently."""


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


def replace_task_vectors(
    *, session: Session, client_id: int, encoder_id: str, vectors: Sequence[Sequence[float]]
) -> int:
    """Replace a device's task vectors with `vectors` (in the caller's transaction)."""
    session.execute(delete(TaskEmbedding).where(TaskEmbedding.client_id == client_id))
    session.add_all(
        TaskEmbedding(
            client_id=client_id,
            vector=task_vector_bytes(vector),
            dim=len(vector),
            encoder_id=encoder_id,
        )
        for vector in vectors
    )
    session.flush()
    return len(vectors)


def latest_clustering(*, session: Session) -> Clustering | None:
    return session.scalar(select(Clustering).order_by(Clustering.version.desc()).limit(1))


def latest_assignment(*, session: Session, client_id: int) -> tuple[Assignment, Clustering] | None:
    """A client's assignment in the newest clustering that has one for it."""
    row = session.execute(
        select(Assignment, Clustering)
        .join(Clustering, Clustering.id == Assignment.clustering_id)
        .where(Assignment.client_id == client_id)
        .order_by(Clustering.version.desc())
        .limit(1)
    ).first()
    return None if row is None else (row[0], row[1])


def latest_version(*, session: Session, name: str) -> tuple[Adapter, AdapterVersion] | None:
    row = session.execute(
        select(Adapter, AdapterVersion)
        .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
        .where(Adapter.name == name)
        .order_by(AdapterVersion.version.desc())
        .limit(1)
    ).first()
    return None if row is None else (row[0], row[1])


def get_version(*, session: Session, version_id: int) -> tuple[Adapter, AdapterVersion] | None:
    version = session.get(AdapterVersion, version_id)
    if version is None:
        return None
    adapter = session.get(Adapter, version.adapter_id)
    assert adapter is not None  # a foreign key
    return adapter, version


def list_adapters(*, session: Session) -> list[tuple[Adapter, AdapterVersion | None, int]]:
    """Every adapter with its latest version (None before the first) and its version count."""
    newest = (
        select(
            AdapterVersion.adapter_id,
            func.max(AdapterVersion.version).label("version"),
            func.count().label("versions"),
        )
        .group_by(AdapterVersion.adapter_id)
        .subquery()
    )
    rows: Sequence[Any] = session.execute(
        select(Adapter, AdapterVersion, newest.c.versions)
        .outerjoin(newest, newest.c.adapter_id == Adapter.id)
        .outerjoin(
            AdapterVersion,
            (AdapterVersion.adapter_id == Adapter.id)
            & (AdapterVersion.version == newest.c.version),
        )
        .order_by(Adapter.name)
    ).all()
    return [(adapter, version, versions or 0) for adapter, version, versions in rows]


def round_versions(*, session: Session, round_id: int) -> list[tuple[Adapter, AdapterVersion]]:
    """The adapter versions a round published."""
    rows = session.execute(
        select(Adapter, AdapterVersion)
        .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
        .where(AdapterVersion.round_id == round_id)
        .order_by(Adapter.name)
    ).all()
    return [(adapter, version) for adapter, version in rows]


def excluded_updates(
    *, session: Session, round_id: int, client_id: int | None = None
) -> list[Update]:
    """The round's updates excluded at aggregation (only `client_id`'s when given)."""
    query = select(Update).where(
        Update.round_id == round_id, Update.status == UpdateStatus.EXCLUDED
    )
    if client_id is not None:
        query = query.where(Update.client_id == client_id)
    return list(session.scalars(query.order_by(Update.id)))


def collecting_round(*, session: Session) -> Round | None:
    return session.scalar(
        select(Round).where(Round.state == RoundState.COLLECTING).order_by(Round.number.desc())
    )


def latest_round(*, session: Session) -> Round | None:
    return session.scalar(select(Round).order_by(Round.number.desc()).limit(1))


def list_rounds(*, session: Session, limit: int) -> list[Round]:
    return list(session.scalars(select(Round).order_by(Round.number.desc()).limit(limit)))


def create_round(*, session: Session, config: RoundConfig, now: datetime) -> Round:
    """Open the next round on the newest clustering; RoundConflictError if one is collecting.

    Two concurrent calls may both see no collecting round; the unique round number then
    refuses the second one when it flushes.
    """
    current = collecting_round(session=session)
    if current is not None:
        raise RoundConflictError(f"round {current.number} (id {current.id}) is still collecting")
    number = (session.scalar(select(func.max(Round.number))) or 0) + 1
    clustering = latest_clustering(session=session)
    deadline = None if config.deadline_s is None else now + timedelta(seconds=config.deadline_s)
    round_ = Round(
        number=number,
        state=RoundState.COLLECTING,
        config=config.model_dump(mode="json"),
        deadline=deadline,
        opened_at=now,
        clustering_id=None if clustering is None else clustering.id,
    )
    session.add(round_)
    session.flush()
    return round_


def move_round(
    *,
    session: Session,
    round_id: int,
    from_state: RoundState,
    to_state: RoundState,
    closed_at: datetime | None = None,
    error: str | None = None,
) -> bool:
    """Change a round's state only if it is still in `from_state`; whether this call did it.

    A conditional UPDATE, so that of several requests or replicas racing, exactly one wins.
    """
    values: dict[str, object] = {"state": to_state, "closed_at": closed_at}
    if error is not None:
        values["error"] = error
    result = session.execute(
        update(Round)
        .where(Round.id == round_id, Round.state == from_state)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def hold_collecting_round(*, session: Session, round_id: int) -> bool:
    """Take the round's row lock if it is collecting; whether it is.

    A no-op UPDATE rather than SELECT ... FOR UPDATE: it locks the row on PostgreSQL and takes
    the write lock on SQLite (which ignores FOR UPDATE), so a concurrent close waits for the
    caller's commit and then sees its update.
    """
    result = session.execute(
        update(Round)
        .where(Round.id == round_id, Round.state == RoundState.COLLECTING)
        .values(state=Round.state)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def collecting_round_ids(*, session: Session) -> list[int]:
    """Every collecting round (normally one), oldest first."""
    return list(
        session.scalars(
            select(Round.id).where(Round.state == RoundState.COLLECTING).order_by(Round.id)
        )
    )


def _counted(round_id: int, *, waiting: bool) -> ColumnElement[bool]:
    """The round's updates that count (received or aggregated), or only those `waiting` for
    aggregation (received)."""
    if waiting:
        return (Update.round_id == round_id) & (Update.status == UpdateStatus.RECEIVED)
    return (Update.round_id == round_id) & (Update.status != UpdateStatus.EXCLUDED)


def count_updates(*, session: Session, round_id: int, waiting: bool = False) -> int:
    """The round's updates that count: received or aggregated, not excluded (`waiting`: only
    the received ones)."""
    return session.scalar(select(func.count()).where(_counted(round_id, waiting=waiting))) or 0


def cluster_members(*, session: Session, clustering_id: int) -> dict[int, int]:
    """Label -> number of assigned clients, for every cluster of a clustering (empty ones too)."""
    members: dict[int, int] = dict.fromkeys(
        session.scalars(select(Cluster.label).where(Cluster.clustering_id == clustering_id)), 0
    )
    rows = session.execute(
        select(Assignment.label, func.count())
        .where(Assignment.clustering_id == clustering_id)
        .group_by(Assignment.label)
    ).all()
    members.update(_label_counts(rows))
    return members


def updates_per_cluster(
    *, session: Session, round_id: int, clustering_id: int, waiting: bool = False
) -> dict[int, int]:
    """Label -> number of the round's updates that count (`waiting`: only the received ones)
    sent by that cluster's members."""
    rows = session.execute(
        select(Assignment.label, func.count(Update.id))
        .join(
            Assignment,
            (Assignment.client_id == Update.client_id)
            & (Assignment.clustering_id == clustering_id),
        )
        .where(_counted(round_id, waiting=waiting))
        .group_by(Assignment.label)
    ).all()
    return _label_counts(rows)


def _label_counts(rows: Iterable[Any]) -> dict[int, int]:
    """(label, count) rows as a dict (aggregate columns come back untyped)."""
    return {int(label): int(count) for label, count in rows}


def get_update(*, session: Session, round_id: int, client_id: int) -> Update | None:
    """The client's newest update in the round (a sync round holds one per client)."""
    return session.scalar(
        select(Update)
        .where(Update.round_id == round_id, Update.client_id == client_id)
        .order_by(Update.seq.desc())
        .limit(1)
    )


def exclude_update(
    *, session: Session, round_id: int, client_id: int, reason: str
) -> Update | None:
    """Exclude `client_id`'s update from the round with `reason`; None if it sent none.

    The caller holds the collecting round's row lock (`hold_collecting_round`).
    """
    row = get_update(session=session, round_id=round_id, client_id=client_id)
    if row is not None:
        row.status = UpdateStatus.EXCLUDED
        row.exclusion_reason = reason
        session.flush()
    return row


def upsert_update(
    *,
    session: Session,
    round_id: int,
    client_id: int,
    stored: StoredObject,
    num_samples: int,
    base_version_id: int | None,
    train_loss: float | None,
    append: bool = False,
) -> tuple[Update, bool]:
    """Record a client's update for a round, replacing its earlier one (`append`: adding it
    after its earlier ones, as a buffered round does); (row, replaced)."""
    row = get_update(session=session, round_id=round_id, client_id=client_id)
    replaced = row is not None and not append
    if row is None or append:
        seq = 0 if row is None else row.seq + 1
        row = Update(round_id=round_id, client_id=client_id, seq=seq)
        session.add(row)
    row.object_key = stored.key
    row.sha256 = stored.sha256
    row.size_bytes = stored.size
    row.num_samples = num_samples
    row.base_version_id = base_version_id
    row.train_loss = train_loss
    row.status = UpdateStatus.RECEIVED
    row.created_at = utcnow()
    session.flush()
    return row, replaced
