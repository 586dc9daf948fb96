"""A worker SIGKILLed while it holds a round: the round loop queues it again and the next
worker publishes it, once, within seconds of being up (not after Redis's 35-minute timeout).
The same for a run killed by Celery's hard time limit, which acknowledges its message: no
redelivery ever comes, only the round loop brings the round back. And a worker SIGKILLed in
the middle of a buffered round's flush: the round loop queues the flush again (the round is
still collecting), the next worker redoes it once, and the round's later flushes follow."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.aggregator.closing import send_aggregation
from services.aggregator.main import create_app
from tessera import procs
from tessera.config import Settings
from tessera.events import AGGREGATION_QUEUE, TASK_AGGREGATE_ROUND, adapter_published_channel
from tessera.federation import RoundConfig
from tessera.lora import LoraSpec
from tessera.model.base import BaseModel
from tessera.models import Adapter, AdapterVersion, Round, RoundState, Update, UpdateStatus
from tessera.stack import WORKER_APP
from tessera.storage import ObjectStore
from tests.helpers import on_redis_db
from tests.services.worker.test_aggregate_round import CENTROIDS, add_updates, build_round
from tests.worker_processes import WorkerProcesses, quick_to_recover

# A wall-clock bound: under pytest-xdist these modules run one at a time, on one worker.
pytestmark = pytest.mark.xdist_group("timed")

# A Redis database of its own: the session's worker (database 0) must not take the round.
QUEUE_DB = 3
STALE_S = 2.0
# Many updates, so that the first worker is still aggregating when it is killed.
MANY: dict[int | None, list[int]] = {0: [5] * 12, 1: [7] * 12}
# A buffered round's flushes: cluster 0's buffer, then cluster 1's (killed half-way), then
# cluster 0's second, uploaded after the recovery; each of BUFFER_K updates, so that a flush
# takes about 0.25 s on a quiet machine.
BUFFER_K = 12
BUFFERED = RoundConfig(
    mode="buffered", buffer_k=BUFFER_K, buffer_versions=3, lam=0.0, weighting="equal"
)
# How long after cluster 0's version is announced the worker is killed: past the loading of
# cluster 1's buffer, into its aggregation (a loaded machine only makes the flush longer).
INTO_FLUSH_S = 0.05
# The killed flush redone this soon after the next worker joins (about 1 s on a quiet machine:
# the round loop queues it again every 0.2 s).
RECOVERY_S = 15.0
# The first run's hard time limit: aggregating MANY takes about 0.9 s on an idle machine.
HARD_LIMIT_S = 0.4


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return quick_to_recover(on_redis_db(settings, QUEUE_DB), stale_s=STALE_S)


@pytest.fixture
def spec(base_model: BaseModel) -> LoraSpec:
    return base_model.lora_spec


@pytest.fixture
def workers(fast: Settings, tmp_path: Path) -> Iterator[WorkerProcesses]:
    pool = WorkerProcesses(fast, tmp_path, app=WORKER_APP)
    yield pool
    pool.close()


class Announcements:
    """The adapter versions announced on Redis, as (adapter, version), subscribed from the
    start of a test; `take` keeps one round's."""

    def __init__(self, redis_url: str) -> None:
        # Kept: a client that is collected closes its pool, the subscription's connection too.
        self._broker = redis.Redis.from_url(redis_url)
        self._events = self._broker.pubsub(ignore_subscribe_messages=True)
        self._events.subscribe(adapter_published_channel(self._broker))
        self.seen: list[tuple[str, int]] = []

    def take(self, round_id: int, wait_s: float) -> None:
        """Read for `wait_s` seconds, keeping what is announced for `round_id`."""
        drained_by = time.monotonic() + wait_s  # None also stands for a skipped subscribe message
        while time.monotonic() < drained_by:
            message = self._events.get_message(timeout=0.01)
            if message is not None and json.loads(message["data"])["round_id"] == round_id:
                event = json.loads(message["data"])
                self.seen.append((event["adapter"], event["version"]))

    def close(self) -> None:
        self._events.close()


@pytest.fixture
def announcements(fast: Settings) -> Iterator[Announcements]:
    listener = Announcements(fast.redis_url or "")
    yield listener
    listener.close()


@pytest.fixture
def hard_limited(fast: Settings, tmp_path: Path) -> Iterator[WorkerProcesses]:
    """Workers whose tasks have no soft time limit: a run over its limit is killed at once."""
    pool = WorkerProcesses(fast, tmp_path, app="tests.hard_limit_worker")
    yield pool
    pool.close()


def _round(session: Session, round_id: int) -> Round:
    session.expire_all()
    return session.get_one(Round, round_id)


def _published(session: Session, round_id: int) -> list[str]:
    """The names of the adapters the round published a version of."""
    return list(
        session.scalars(
            select(Adapter.name)
            .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
            .where(AdapterVersion.round_id == round_id)
            .order_by(Adapter.name)
        ).all()
    )


@pytest.mark.slow
def test_a_round_held_by_a_killed_worker_is_published_once_by_the_next(
    fast: Settings,
    session: Session,
    store: ObjectStore,
    spec: LoraSpec,
    workers: WorkerProcesses,
    announcements: Announcements,
) -> None:
    relay = workers.relay(AGGREGATION_QUEUE)
    with TestClient(create_app(fast)):  # the round loop, every 0.2 s
        for seed in (0, 100, 200):  # the kill must land while the worker aggregates
            built = build_round(
                session, store, spec, config=RoundConfig(), clusters=MANY,
                centroids=CENTROIDS, seed=seed,
            )  # fmt: skip
            send_aggregation(workers.celery, built.round_id)
            procs.wait_until(
                lambda round_id=built.round_id: _round(session, round_id).attempts >= 1,
                timeout=60,
                what="the worker taking the round",
                interval=0.01,
            )
            killed_at = relay.kill_first()
            if _round(session, built.round_id).state == RoundState.AGGREGATING:
                break
            relay.replace_first()
        else:
            pytest.fail("the worker finished every round before it could be killed")
        up_at = relay.bring_standby()
        procs.wait_until(
            lambda: _round(session, built.round_id).state == RoundState.PUBLISHED,
            timeout=60,
            what="the round published by the next worker",
            interval=0.05,
        )
        published_at = time.monotonic()
        time.sleep(2 * STALE_S)  # no second run may publish or announce it again

    announcements.take(built.round_id, 1.0)
    row = _round(session, built.round_id)
    published = _published(session, built.round_id)
    recovery_s, since_kill_s = published_at - up_at, published_at - killed_at
    print(
        f"published {recovery_s:.1f} s after the next worker joined the queue, "
        f"{since_kill_s:.1f} s after the kill"
    )
    assert row.state == RoundState.PUBLISHED and row.attempts == 2  # the killed run, the next
    assert published == ["cluster:0", "cluster:1", "global"]  # each version once
    announced = sorted(name for name, _ in announcements.seen)
    assert announced == ["cluster:0", "cluster:1", "global"]  # each announced once
    assert recovery_s < 4 * STALE_S + 10


@pytest.mark.slow
def test_a_round_whose_run_hit_the_hard_time_limit_is_published_by_the_next_run(
    fast: Settings,
    session: Session,
    store: ObjectStore,
    spec: LoraSpec,
    hard_limited: WorkerProcesses,
) -> None:
    workers = hard_limited
    broker = redis.Redis.from_url(fast.redis_url or "")
    worker, node = workers.spawn(AGGREGATION_QUEUE)
    workers.wait_ready(worker, node)
    with TestClient(create_app(fast)):  # the round loop, every 0.2 s
        built = build_round(
            session, store, spec, config=RoundConfig(), clusters=MANY, centroids=CENTROIDS
        )
        # The round's first message, as send_aggregation sends it but with a short time limit
        # and its result kept (to see the time limit's verdict). The round loop's later message
        # has the default limit.
        timed_out = workers.celery.send_task(
            TASK_AGGREGATE_ROUND,
            args=[built.round_id],
            queue=AGGREGATION_QUEUE,
            time_limit=HARD_LIMIT_S,
        )
        procs.wait_until(
            lambda: timed_out.state == "FAILURE", timeout=60, what="the hard time limit"
        )
        killed_at = time.monotonic()
        after_kill = _round(session, built.round_id)
        state_after_kill, runs_before = after_kill.state, after_kill.attempts
        procs.wait_until(
            lambda: not any(timed_out.id.encode() in value for value in broker.hvals("unacked")),
            timeout=5,
            what="the timed-out run's message acknowledged",
        )
        procs.wait_until(
            lambda: _round(session, built.round_id).state == RoundState.PUBLISHED,
            timeout=60,
            what="the round published by the next run",
            interval=0.05,
        )
        recovery_s = time.monotonic() - killed_at

    row = _round(session, built.round_id)
    print(f"published {recovery_s:.1f} s after the hard time limit killed its first run")
    assert type(timed_out.result).__name__ == "TimeLimitExceeded"
    assert state_after_kill == RoundState.AGGREGATING  # killed mid-run, not after it
    assert row.state == RoundState.PUBLISHED and row.attempts == runs_before + 1  # one more run
    assert _published(session, built.round_id) == ["cluster:0", "cluster:1", "global"]
    assert recovery_s < 4 * STALE_S + 10


def _versions(session: Session, round_id: int) -> list[tuple[str, int, int, int]]:
    """(adapter, version, flush, updates aggregated) of each version the round published, in
    order of publication."""
    session.expire_all()
    return [
        (name, version, flush, metrics["updates"])
        for name, version, flush, metrics in session.execute(
            select(
                Adapter.name, AdapterVersion.version, AdapterVersion.flush, AdapterVersion.metrics
            )
            .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
            .where(AdapterVersion.round_id == round_id)
            .order_by(AdapterVersion.id)
        )
    ]


def _statuses(session: Session, round_id: int) -> dict[int, UpdateStatus]:
    session.expire_all()
    rows = session.execute(select(Update.id, Update.status).where(Update.round_id == round_id))
    return {update_id: status for update_id, status in rows}


@pytest.mark.slow
def test_a_buffered_flush_killed_with_its_worker_is_redone_once_by_the_next(
    fast: Settings,
    session: Session,
    store: ObjectStore,
    spec: LoraSpec,
    workers: WorkerProcesses,
    announcements: Announcements,
) -> None:
    announced = announcements.seen
    relay = workers.relay(AGGREGATION_QUEUE)
    with TestClient(create_app(fast)):  # the round loop, every 0.2 s, queues the flushes
        built = build_round(
            session, store, spec, config=BUFFERED, state=RoundState.COLLECTING,
            clusters={0: [5] * BUFFER_K, 1: [7] * BUFFER_K}, centroids=CENTROIDS,
        )  # fmt: skip
        round_id = built.round_id

        def first_announced() -> bool:
            announcements.take(round_id, 0.05)
            return announced != []

        # Cluster 0's version announced: the worker has gone on to cluster 1's buffer.
        procs.wait_until(
            first_announced,
            timeout=60,
            what="the first flush announced",
            interval=0.0,
        )
        time.sleep(INTO_FLUSH_S)
        killed_at = relay.kill_first()
        after_kill = _versions(session, round_id)
        waiting_after_kill = _statuses(session, round_id)
        up_at = relay.bring_standby()
        procs.wait_until(
            lambda: len(_versions(session, round_id)) == 2,
            timeout=60,
            what="the killed flush redone by the next worker",
            interval=0.05,
        )
        redone_at = time.monotonic()
        # The round goes on: cluster 0's second buffer, uploaded now, is its third version.
        clustering_id = _round(session, round_id).clustering_id
        assert clustering_id is not None
        later = add_updates(
            session, store, spec, round_id=round_id, clustering_id=clustering_id, label=0,
            samples=[5] * BUFFER_K, seed=1000,
        )  # fmt: skip
        session.commit()
        procs.wait_until(
            lambda: _round(session, round_id).state == RoundState.PUBLISHED,
            timeout=60,
            what="the round published by its third flush",
            interval=0.05,
        )
        announcements.take(round_id, 1.0)  # and no flush may publish or announce twice

    row = _round(session, round_id)
    versions = _versions(session, round_id)
    statuses = _statuses(session, round_id)
    print(
        f"flush redone {redone_at - up_at:.1f} s after the next worker joined the queue, "
        f"{redone_at - killed_at:.1f} s after the kill"
    )
    first = [m.update_id for m in built.members[0]]
    killed = [m.update_id for m in built.members[1]]
    assert [name for name, *_ in after_kill] == ["cluster:0"]  # killed before cluster 1's
    assert [waiting_after_kill[u] for u in killed] == [UpdateStatus.RECEIVED] * BUFFER_K
    assert [(name, flush, updates) for name, _, flush, updates in versions] == [
        ("cluster:0", 1, BUFFER_K),
        ("cluster:1", 1, BUFFER_K),
        ("cluster:0", 2, BUFFER_K),
    ]  # each buffer published once, by one flush
    assert sorted(announced) == sorted((name, version) for name, version, *_ in versions)
    assert versions[2][1] == versions[0][1] + 1  # cluster 0's next version
    assert set(statuses) == {*first, *killed, *(m.update_id for m in later)}
    assert set(statuses.values()) == {UpdateStatus.AGGREGATED}  # none lost
    assert row.report is not None and row.report["versions"] == 3
    assert row.state == RoundState.PUBLISHED
    assert redone_at - up_at < RECOVERY_S
