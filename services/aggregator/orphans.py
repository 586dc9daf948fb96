"""Update objects that no row refers to: left by an upload killed between write and commit;
and uploads begun through a slot (`services.aggregator.slots`) whose slot expired uncommitted.

Uploads are content-addressed (`tessera.federation.update_key`): a new object never overwrites
the accepted one, the row switches to it in one transaction, and the old object is deleted
after the commit. A process that dies between the write and the commit (or before deleting the
old object) leaves an object no row names; the round loop deletes those once they are older
than ORPHAN_GRACE_S, which no upload spends between its write and its commit.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tessera.federation import UPDATES_PREFIX
from tessera.models import Update, utcnow
from tessera.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 900.0
ORPHAN_SWEEP_INTERVAL_S = 600.0
_QUERY_CHUNK = 500


def sweep_orphaned_updates(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    grace_s: float = ORPHAN_GRACE_S,
    now: datetime | None = None,
) -> list[str]:
    """Delete update objects older than `grace_s` that no update row names; their keys."""
    cutoff = (now or utcnow()) - timedelta(seconds=grace_s)
    old = [key for key, modified in store.list_modified(UPDATES_PREFIX) if modified < cutoff]
    named: set[str] = set()
    with sessions() as session:
        for start in range(0, len(old), _QUERY_CHUNK):
            chunk = old[start : start + _QUERY_CHUNK]
            named.update(
                session.scalars(select(Update.object_key).where(Update.object_key.in_(chunk)))
            )
    deleted = []
    for key in old:
        if key in named:
            continue
        try:
            store.delete(key)
        except StorageError:
            log.exception("could not delete an orphaned update", extra={"key": key})
            continue
        deleted.append(key)
    if deleted:
        log.warning("orphaned update objects deleted", extra={"count": len(deleted)})
    return deleted


def abort_abandoned_uploads(
    *, store: ObjectStore, older_than_s: float, now: datetime | None = None
) -> list[str]:
    """Abort the update uploads begun through a slot more than `older_than_s` ago (their slot
    has expired, so nothing can complete them); the keys they were for."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    aborted = []
    for upload in store.pending_uploads(UPDATES_PREFIX):
        if upload.initiated is None or upload.initiated >= cutoff:
            continue
        try:
            store.abort_multipart(upload.key, upload_id=upload.upload_id)
        except StorageError:
            log.exception("could not abort an abandoned upload", extra={"key": upload.key})
            continue
        aborted.append(upload.key)
    if aborted:
        log.warning("abandoned uploads aborted", extra={"count": len(aborted)})
    return aborted
