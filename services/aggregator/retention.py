"""Raw updates do not outlive their round: the round loop deletes them once it is over.

A round's update objects are deleted TESSERA_UPDATE_RETENTION_DAYS (0 by default: at the next
pass) after it was published or cancelled; their rows stay, with their status, exclusion
reasons and the round's report, so the round can still be audited. A failed round keeps its
updates, since an operator may retry it. The round records when its objects went
(`Round.updates_deleted_at`), so each round is swept once; a round whose objects cannot all be
deleted is left for the next pass.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from tessera.federation import update_prefix
from tessera.models import Round, RoundState, Update, utcnow
from tessera.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

ROUNDS_PER_PASS = 50  # a backlog (a retention lowered on a long-running federation) drains


def delete_expired_updates(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    retention_days: float,
    now: datetime | None = None,
) -> list[int]:
    """Delete the update objects of rounds over for `retention_days`; those rounds' ids."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    with sessions() as session:
        due = session.execute(
            select(Round.id)
            .where(
                Round.updates_deleted_at.is_(None),
                or_(
                    (Round.state == RoundState.PUBLISHED) & (Round.published_at <= cutoff),
                    (Round.state == RoundState.CANCELLED) & (Round.closed_at <= cutoff),
                ),
            )
            .order_by(Round.id)
            .limit(ROUNDS_PER_PASS)
        ).all()
        keys = {
            round_id: set(
                session.scalars(select(Update.object_key).where(Update.round_id == round_id))
            )
            for (round_id,) in due
        }
    swept = []
    for round_id, named in keys.items():
        try:
            # Objects no row names any more (a replaced upload's) go with the round too.
            for key in sorted(named | set(store.list_keys(update_prefix(round_id)))):
                store.delete(key)
        except StorageError:
            log.exception("could not delete a round's updates", extra={"round_id": round_id})
            continue
        with sessions() as session:
            session.execute(
                update(Round).where(Round.id == round_id).values(updates_deleted_at=utcnow())
            )
            session.commit()
        swept.append(round_id)
    if swept:
        log.info("raw updates deleted", extra={"rounds": swept})
    return swept
