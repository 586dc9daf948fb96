"""Writing a round's aggregated adapters as new versions, all at once, and announcing them.

`publish_round` inserts every version and moves the round to published in one transaction that
first takes the round's row (the caller's conditional UPDATE from aggregating): a duplicate run (a
redelivered or requeued message) waits for it and then finds the round published, and an
operator who failed the round first leaves it nothing to publish. A run killed half-way
publishes nothing; its rerun writes every version. The unique (adapter_id, round_id, flush)
constraint stays as a second guard (flush is 0 in a sync round; a buffered round publishes each
adapter once per flush, `services.worker.buffered`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from tessera.events import adapter_published_channel
from tessera.federation import adapter_key
from tessera.lora import LoraAdapter, adapter_to_bytes
from tessera.models import Adapter, AdapterKind, AdapterVersion, Round, RoundState
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)

# Tries at a version number when other rounds publish the same adapter at the same time.
VERSION_ATTEMPTS = 5


@dataclass(frozen=True)
class ToPublish:
    """An adapter a round publishes: its line's name and kind, the weights and their metrics."""

    name: str
    kind: AdapterKind
    cluster_label: int | None
    adapter: LoraAdapter
    metrics: dict[str, Any]


@dataclass(frozen=True)
class PublishedVersion:
    adapter: str
    version: int
    version_id: int
    object_key: str
    sha256: str
    size_bytes: int
    rank: int
    metrics: dict[str, Any]
    reused: bool

    @classmethod
    def of(cls, row: AdapterVersion, name: str, *, reused: bool) -> PublishedVersion:
        return cls(
            adapter=name,
            version=row.version,
            version_id=row.id,
            object_key=row.object_key,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            rank=row.rank,
            metrics=dict(row.metrics),
            reused=reused,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "version": self.version,
            "version_id": self.version_id,
            "object_key": self.object_key,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "rank": self.rank,
            "reused": self.reused,
            "metrics": self.metrics,
        }

    def event(self, *, round_id: int) -> dict[str, Any]:
        """The message on `adapter_published_channel`."""
        return {
            "adapter": self.adapter,
            "version": self.version,
            "version_id": self.version_id,
            "object_key": self.object_key,
            "sha256": self.sha256,
            "round_id": round_id,
        }


def publish_round(
    outputs: Sequence[ToPublish],
    *,
    round_id: int,
    method: str,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    finish: Callable[[Session], bool],
    flush: bool = False,
) -> list[PublishedVersion] | RoundState:
    """Publish every output as a new version, in one commit with `finish` (which moves the round
    from aggregating to published first, and records its updates); the versions, or the state
    another run or an operator left the round in when `finish` finds it moved. `flush`: a
    buffered round's flush, whose versions are numbered by flush within the round."""
    adapter_ids = [_adapter_id(sessions, output) for output in outputs]  # lines commit alone
    for _ in range(VERSION_ATTEMPTS):
        with sessions() as session:
            if not finish(session):
                session.rollback()
                return session.get_one(Round, round_id).state
            rows = [
                _add_version(
                    session, output, adapter_id, round_id, method=method, store=store, flush=flush
                )
                for output, adapter_id in zip(outputs, adapter_ids, strict=True)
            ]
            try:
                session.commit()
            except IntegrityError:
                session.rollback()  # another round took a version number: try the next ones
                continue
            for row, output in zip(rows, outputs, strict=True):
                log.info(
                    "adapter version published",
                    extra={"adapter": output.name, "version": row.version, "round_id": round_id},
                )
            return [
                PublishedVersion.of(row, output.name, reused=False)
                for row, output in zip(rows, outputs, strict=True)
            ]
    raise RuntimeError(
        f"no free version numbers for round {round_id} after {VERSION_ATTEMPTS} tries"
    )


def publish_version(
    output: ToPublish,
    *,
    round_id: int,
    method: str,
    sessions: sessionmaker[Session],
    store: ObjectStore,
) -> PublishedVersion:
    """Publish one adapter version whatever the round's state (benchmarks, tests): the round's
    existing version of it if there is one, else a new one."""
    adapter_id = _adapter_id(sessions, output)
    for _ in range(VERSION_ATTEMPTS):
        with sessions() as session:
            if existing := _round_version(session, adapter_id, round_id):
                return PublishedVersion.of(existing, output.name, reused=True)
            row = _add_version(session, output, adapter_id, round_id, method=method, store=store)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                continue
            return PublishedVersion.of(row, output.name, reused=False)
    raise RuntimeError(
        f"no free version number for adapter {output.name!r} after {VERSION_ATTEMPTS} attempts"
    )


def _add_version(
    session: Session,
    output: ToPublish,
    adapter_id: int,
    round_id: int,
    *,
    method: str,
    store: ObjectStore,
    flush: bool = False,
) -> AdapterVersion:
    """Write the next version's file (its key fixed per round and flush: a rerun overwrites its
    own leftover) and add its row to the session, uncommitted."""
    latest = session.scalar(
        select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter_id)
    )
    version = (latest or 0) + 1
    number = 0
    if flush:
        flushed = session.scalar(
            select(func.max(AdapterVersion.flush)).where(
                AdapterVersion.adapter_id == adapter_id, AdapterVersion.round_id == round_id
            )
        )
        number = (flushed or 0) + 1
    energy = output.metrics.get("energy_kept")
    extra = {
        "adapter_id": f"{output.name}@v{version}",
        "round": str(round_id),
        "method": method,
        "updates": str(output.metrics.get("updates", "")),
        "samples": str(output.metrics.get("samples", "")),
        **({"energy_kept": f"{energy:.6f}"} if energy is not None else {}),
    }
    stored = store.put_bytes(
        adapter_key(output.name, round_id, number),
        adapter_to_bytes(output.adapter.with_extra(**extra)),
    )
    row = AdapterVersion(
        adapter_id=adapter_id,
        version=version,
        round_id=round_id,
        object_key=stored.key,
        sha256=stored.sha256,
        size_bytes=stored.size,
        rank=output.adapter.rank,
        metrics=output.metrics,
        flush=number,
    )
    session.add(row)
    session.flush()
    return row


def announce(redis: Redis, versions: Sequence[PublishedVersion], *, round_id: int) -> int:
    """Publish one event per version; return how many went out (a Redis outage loses them)."""
    sent = 0
    channel = adapter_published_channel(redis)
    for version in versions:
        try:
            redis.publish(channel, json.dumps(version.event(round_id=round_id)))
        except RedisError as error:
            log.warning(
                "adapter published but not announced",
                extra={"adapter": version.adapter, "version": version.version, "error": str(error)},
            )
            continue
        sent += 1
    return sent


def _adapter_id(sessions: sessionmaker[Session], output: ToPublish) -> int:
    """The id of the adapter line named `output.name`, created (and committed) if new."""
    query = select(Adapter.id).where(Adapter.name == output.name)
    with sessions() as session:
        found = session.scalar(query)
        if found is not None:
            return found
        session.add(Adapter(name=output.name, kind=output.kind, cluster_label=output.cluster_label))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()  # created meanwhile by another run
        return session.scalars(query).one()


def _round_version(session: Session, adapter_id: int, round_id: int) -> AdapterVersion | None:
    return session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter_id, AdapterVersion.round_id == round_id
        )
    )
