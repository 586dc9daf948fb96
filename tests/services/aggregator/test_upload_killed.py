"""The aggregator SIGKILLed between an upload's object write and its commit: an accepted update
and its object are intact (a re-upload), no update is recorded (a first upload), and the orphan
sweep removes the object the kill left."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from services.aggregator import crud
from services.aggregator.orphans import sweep_orphaned_updates
from tessera import db, procs
from tessera.config import Settings
from tessera.federation import update_key
from tessera.lora import LoraSpec
from tessera.models import utcnow
from tessera.stack import SERVICE_APPS
from tessera.storage import ObjectStore
from tests.helpers import bearer
from tests.services.aggregator.helpers import lora_file, open_round, upload
from tests.serving import served_process


@pytest.mark.slow
@pytest.mark.parametrize("reupload", [True, False], ids=["re-upload", "first upload"])
def test_a_kill_between_write_and_commit_loses_no_update_and_leaves_no_orphan(
    reupload: bool,
    aggregator: TestClient,
    operator: dict,
    device: dict,
    spec: LoraSpec,
    settings: Settings,
    session: Session,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    round_ = open_round(aggregator, operator, min_updates=5)
    first, second = lora_file(spec, 1), lora_file(spec, 2)
    if reupload:
        accepted = upload(aggregator, device["token"], round_["id"], device["id"], first)
        assert accepted.status_code == 201
    slot = update_key(round_["id"], device["id"], "").rsplit("/", 1)[0] + "/"
    sessions = db.session_factory(db.create_db_engine(settings.resolved_database_url))
    log_path = tmp_path / "aggregator.log"
    with served_process(SERVICE_APPS["aggregator"], settings, log_path) as (url, server):
        # Hold the round's row (as a close in progress would): the upload writes its object,
        # then waits for the row, between its write and its commit.
        holder = sessions()
        assert crud.hold_collecting_round(session=holder, round_id=round_["id"])

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                httpx.put(
                    f"{url}/v1/rounds/{round_['id']}/updates/{device['id']}",
                    content=second if reupload else first,
                    params={"num_samples": 16},
                    headers={**bearer(device["token"]), "Content-Type": "application/octet-stream"},
                    timeout=60,
                )

        request = threading.Thread(target=send, daemon=True)
        request.start()
        written = len(store.list_keys(slot)) + 1
        procs.wait_until(
            lambda: len(store.list_keys(slot)) == written, timeout=60, what="the write"
        )
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        holder.rollback()
        holder.close()
        request.join(10)

    row = crud.get_update(session=session, round_id=round_["id"], client_id=device["id"])
    kept = []
    if reupload:  # the accepted update is intact
        assert row is not None and row.sha256 == hashlib.sha256(first).hexdigest()
        assert store.get_bytes(row.object_key, expected_sha256=row.sha256) == first
        kept = [row.object_key]
    else:  # nothing was accepted, nothing is recorded
        assert row is None
    left = [key for key in store.list_keys(slot) if key not in kept]
    assert len(left) == 1  # the killed request's object, which no row names
    swept = sweep_orphaned_updates(
        sessions=sessions, store=store, grace_s=0, now=utcnow() + timedelta(seconds=5)
    )
    assert swept == left
    assert store.list_keys(slot) == kept
