"""The aggregate_round task, on a real database, object store and Redis."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import redis
import torch
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.worker import context, publishing
from services.worker.rounds import TRANSIENT_ERRORS, aggregate_round_now
from services.worker.tasks import federation
from tessera import procs
from tessera.config import Settings
from tessera.events import AGGREGATION_QUEUE, TASK_AGGREGATE_ROUND, adapter_published_channel
from tessera.federation import RoundConfig, update_key
from tessera.lora import LoraAdapter, LoraSpec, adapter_from_bytes, adapter_to_bytes, random_adapter
from tessera.lora.bounds import ScaleRange
from tessera.model.base import BaseModel
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
    Update,
    UpdateStatus,
)
from tessera.queue import make_celery
from tessera.service.resources import Resources
from tessera.storage import ObjectStore, StorageUnavailableError

UPDATE_RANK = 4
TOLERANCE = 1e-3  # on products of entries ~0.2, after the fp16 wire both ways


@pytest.fixture(scope="module")
def spec(base_model: BaseModel) -> LoraSpec:
    return base_model.lora_spec


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """As in a worker process (see tasks.federation): MKL's threaded SVD crawls on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def resources(settings: Settings, store: ObjectStore) -> Iterator[Resources]:
    res = Resources(settings)
    yield res
    res.close()


@dataclass
class Member:
    client_id: int
    update_id: int
    adapter: LoraAdapter  # as the worker reads it back: through fp16
    samples: int


@dataclass
class Built:
    round_id: int
    members: dict[int | None, list[Member]] = field(default_factory=dict)

    def all(self) -> list[Member]:
        return [m for ms in self.members.values() for m in ms]


def _client(session: Session) -> Client:
    client = Client(
        name=f"device-{uuid.uuid4().hex[:8]}", role=Role.DEVICE, token_hash=uuid.uuid4().hex
    )
    session.add(client)
    session.flush()
    return client


def build_round(
    session: Session,
    store: ObjectStore,
    spec: LoraSpec,
    *,
    config: RoundConfig,
    clusters: dict[int | None, list[int]],
    centroids: dict[int, list[float]] | None = None,
    state: RoundState = RoundState.AGGREGATING,
    seed: int = 0,
) -> Built:
    """A round with one uploaded update per sample count; label None: a device never assigned."""
    clustering = Clustering(version=seed + 1, algorithm="test")
    session.add(clustering)
    session.flush()
    for cluster_label, centroid in (centroids or {}).items():
        session.add(
            Cluster(
                clustering_id=clustering.id,
                label=cluster_label,
                centroid=np.asarray(centroid, dtype="<f4").tobytes(),
                size=len(clusters.get(cluster_label, [])),
            )
        )
    round_row = Round(
        number=seed + 1, state=state, config=config.model_dump(), clustering_id=clustering.id
    )
    session.add(round_row)
    session.flush()
    built = Built(round_id=round_row.id)
    for label, sample_counts in clusters.items():
        built.members[label] = add_updates(
            session,
            store,
            spec,
            round_id=round_row.id,
            clustering_id=clustering.id,
            label=label,
            samples=sample_counts,
            seed=seed,
        )
        seed += len(sample_counts)
    session.commit()
    return built


def add_updates(
    session: Session,
    store: ObjectStore,
    spec: LoraSpec,
    *,
    round_id: int,
    clustering_id: int,
    label: int | None,
    samples: list[int],
    seed: int,
) -> list[Member]:
    """One update received from a new device of cluster `label` per sample count (uncommitted),
    the n-th drawn with seed `seed` + n."""
    members = []
    for offset, count in enumerate(samples, start=1):
        client = _client(session)
        if label is not None:
            session.add(Assignment(clustering_id=clustering_id, client_id=client.id, label=label))
        data = adapter_to_bytes(
            random_adapter(spec, UPDATE_RANK, float(UPDATE_RANK), seed=seed + offset, std=0.3)
        )
        sha256 = hashlib.sha256(data).hexdigest()
        stored = store.put_bytes(update_key(round_id, client.id, sha256), data)
        row = Update(
            client_id=client.id,
            round_id=round_id,
            object_key=stored.key,
            sha256=stored.sha256,
            size_bytes=stored.size,
            num_samples=count,
            train_loss=0.1 * count,
            status=UpdateStatus.RECEIVED,
        )
        session.add(row)
        session.flush()
        members.append(Member(client.id, row.id, adapter_from_bytes(data), count))
    return members


def run(resources: Resources, round_id: int) -> dict[str, Any]:
    return aggregate_round_now(
        round_id,
        sessions=resources.sessions,
        store=resources.store,
        redis=resources.redis,
        scales=ScaleRange(1e-3, 16.0),
    )


def mean_delta(members: list[Member], module: str) -> torch.Tensor:
    total = sum(m.samples for m in members)
    return sum(m.adapter.delta(module).double() * m.samples for m in members) / total


def published(session: Session, store: ObjectStore, name: str, round_id: int) -> LoraAdapter:
    row: AdapterVersion = session.scalars(
        select(AdapterVersion)
        .join(Adapter)
        .where(Adapter.name == name, AdapterVersion.round_id == round_id)
    ).one()
    return adapter_from_bytes(store.get_bytes(row.object_key, expected_sha256=row.sha256))


def max_error(adapter: LoraAdapter, expected: dict[str, torch.Tensor]) -> float:
    return max(
        float((adapter.delta(m).double() - want).abs().max()) for m, want in expected.items()
    )


def versions(session: Session) -> list[tuple[str, int, int]]:
    session.expire_all()
    rows = session.execute(
        select(Adapter.name, AdapterVersion.version, AdapterVersion.id)
        .join(Adapter)
        .order_by(AdapterVersion.id)
    )
    return [tuple(row) for row in rows]  # type: ignore[misc]


def states(session: Session, round_id: int) -> tuple[RoundState, dict[int, UpdateStatus]]:
    session.expire_all()
    round_row = session.get_one(Round, round_id)
    updates: list[Update] = list(session.scalars(select(Update).where(Update.round_id == round_id)))
    return round_row.state, {u.id: u.status for u in updates}


TWO_CLUSTERS: dict[int | None, list[int]] = {0: [30, 10], 1: [20, 20]}
CENTROIDS = {0: [1.0, 0.0, 0.2], 1: [0.8, 0.6, 0.0]}


def test_cluster_adapters_are_the_weighted_mean_of_products_and_announced(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec, redis_url: str
) -> None:
    config = RoundConfig(rank=2 * UPDATE_RANK, lam=0.0)
    built = build_round(
        session, store, spec, config=config, clusters=TWO_CLUSTERS, centroids=CENTROIDS
    )
    broker = redis.Redis.from_url(redis_url)
    listener = broker.pubsub()
    listener.subscribe(adapter_published_channel(broker))
    assert listener.get_message(timeout=5)["type"] == "subscribe"

    summary = run(resources, built.round_id)

    assert summary["status"] == "published" and summary["excluded"] == []
    assert [a["adapter"] for a in summary["adapters"]] == ["cluster:0", "cluster:1", "global"]
    for label, members in built.members.items():
        adapter = published(session, store, f"cluster:{label}", built.round_id)
        expected = {m: mean_delta(members, m) for m in spec.modules}
        assert max_error(adapter, expected) < TOLERANCE
        assert adapter.extra["adapter_id"] == f"cluster:{label}@v1"
    metrics = summary["adapters"][0]["metrics"]
    assert metrics["updates"] == 2 and metrics["samples"] == 40
    assert metrics["energy_kept"] == pytest.approx(1.0)
    assert metrics["mean_train_loss"] == pytest.approx(2.0)
    # The global adapter: all products' mean, truncated to the round's rank.
    everyone = built.all()
    energy = summary["adapters"][2]["metrics"]["energy_kept"]
    glob = published(session, store, "global", built.round_id)
    err = norm = 0.0
    for module in spec.modules:
        want = mean_delta(everyone, module)
        err += float((glob.delta(module).double() - want).square().sum())
        norm += float(want.square().sum())
    assert math.sqrt(err) <= (math.sqrt(max(0.0, 1 - energy)) + TOLERANCE) * math.sqrt(norm)
    assert summary["adapters"][2]["metrics"]["updates"] == 4
    state, statuses = states(session, built.round_id)
    assert state is RoundState.PUBLISHED
    assert set(statuses.values()) == {UpdateStatus.AGGREGATED}

    events = []
    while (message := listener.get_message(ignore_subscribe_messages=True, timeout=2)) is not None:
        events.append(json.loads(message["data"]))
    listener.close()
    assert events == [
        {key: a[key] for key in ("adapter", "version", "version_id", "object_key", "sha256")}
        | {"round_id": built.round_id}
        for a in summary["adapters"]
    ]


def test_lam_mixes_in_the_neighbour_by_its_similarity(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    config = RoundConfig(rank=4 * UPDATE_RANK, lam=0.25, temperature=0.5)
    built = build_round(
        session, store, spec, config=config, clusters=TWO_CLUSTERS, centroids=CENTROIDS
    )

    summary = run(resources, built.round_id)

    own = {
        label: {m: mean_delta(ms, m) for m in spec.modules} for label, ms in built.members.items()
    }
    a, b = (np.asarray(CENTROIDS[c]) for c in (0, 1))
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    share = 0.25 / (1 + math.exp((1 - cosine) / 0.5))  # lam times the neighbour's softmax
    for label, other in ((0, 1), (1, 0)):
        adapter = published(session, store, f"cluster:{label}", built.round_id)
        expected = {m: (1 - share) * own[label][m] + share * own[other][m] for m in spec.modules}
        assert max_error(adapter, expected) < TOLERANCE
    assert summary["adapters"][0]["metrics"]["blend_energy_kept"] == pytest.approx(1.0)


def test_running_twice_publishes_each_version_once(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    built = build_round(
        session, store, spec, config=RoundConfig(), clusters=TWO_CLUSTERS, centroids=CENTROIDS
    )

    first = run(resources, built.round_id)
    rows = versions(session)
    second = run(resources, built.round_id)

    assert versions(session) == rows and len(rows) == 3
    assert second["status"] == "already_published" and second["events"] == 0
    ids = [a["version_id"] for a in first["adapters"]]
    assert [a["version_id"] for a in second["adapters"]] == ids
    assert all(a["reused"] for a in second["adapters"])


class Killed(BaseException):
    """Stands for SIGKILL: no `except Exception` sees it."""


def test_a_rerun_after_a_kill_mid_way_completes_the_round(
    session: Session,
    store: ObjectStore,
    resources: Resources,
    spec: LoraSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = build_round(
        session, store, spec, config=RoundConfig(), clusters=TWO_CLUSTERS, centroids=CENTROIDS
    )
    real = publishing._add_version
    done: list[Any] = []

    def dies_after_one(*args: Any, **kwargs: Any) -> Any:
        if done:
            raise Killed
        done.append(real(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(publishing, "_add_version", dies_after_one)
    with pytest.raises(Killed):
        run(resources, built.round_id)
    assert versions(session) == []  # nothing half-published
    assert states(session, built.round_id)[0] is RoundState.AGGREGATING
    monkeypatch.undo()

    summary = run(resources, built.round_id)

    rows = versions(session)
    assert [(name, version) for name, version, _ in rows] == [
        ("cluster:0", 1),
        ("cluster:1", 1),
        ("global", 1),
    ]
    assert [a["reused"] for a in summary["adapters"]] == [False, False, False]
    assert summary["status"] == "published" and summary["events"] == 3


def test_bad_update_objects_are_excluded_and_the_rest_aggregate(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    config = RoundConfig(rank=3 * UPDATE_RANK, lam=0.0)
    built = build_round(
        session, store, spec, config=config, clusters={0: [5, 7, 9, 11]}, centroids=CENTROIDS
    )
    good, corrupt, missing, unreadable = built.members[0]
    corrupt_key = session.get_one(Update, corrupt.update_id).object_key
    data = store.get_bytes(corrupt_key)
    store.put_bytes(corrupt_key, data[:-4] + b"\0\0\0\0")
    session.get_one(Update, missing.update_id).object_key = f"updates/missing-{uuid.uuid4().hex}"
    row = session.get_one(Update, unreadable.update_id)
    junk = store.put_bytes(row.object_key, b"not safetensors")
    row.sha256, row.size_bytes = junk.sha256, junk.size
    session.commit()

    summary = run(resources, built.round_id)

    reasons = {e["update_id"]: e["reason"] for e in summary["excluded"]}
    assert set(reasons) == {corrupt.update_id, missing.update_id, unreadable.update_id}
    assert "sha256" in reasons[corrupt.update_id]
    assert "missing" in reasons[missing.update_id]
    assert "not a readable adapter" in reasons[unreadable.update_id]
    adapter = published(session, store, "cluster:0", built.round_id)
    assert max_error(adapter, {m: good.adapter.delta(m).double() for m in spec.modules}) < TOLERANCE
    _, statuses = states(session, built.round_id)
    assert statuses[good.update_id] is UpdateStatus.AGGREGATED
    assert statuses[corrupt.update_id] is UpdateStatus.EXCLUDED


def test_a_cluster_below_quorum_does_not_publish(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    config = RoundConfig(min_updates_per_cluster=2)
    built = build_round(
        session, store, spec, config=config, clusters={0: [4, 4], 1: [9]}, centroids=CENTROIDS
    )

    summary = run(resources, built.round_id)

    assert [a["adapter"] for a in summary["adapters"]] == ["cluster:0", "global"]
    (lonely,) = built.members[1]
    assert summary["excluded"][0]["update_id"] == lonely.update_id
    assert summary["clusters"][1]["published"] is False
    assert "below quorum" in summary["clusters"][1]["reason"]
    assert summary["adapters"][1]["metrics"]["updates"] == 2
    _, statuses = states(session, built.round_id)
    assert statuses[lonely.update_id] is UpdateStatus.EXCLUDED


def test_devices_without_assignment_fall_back_or_are_excluded(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    built = build_round(session, store, spec, config=RoundConfig(), clusters={0: [3], None: [5, 6]})
    older = Clustering(version=0, algorithm="test")
    session.add(older)
    session.flush()
    moved, never = built.members[None]
    session.add(Assignment(clustering_id=older.id, client_id=moved.client_id, label=0))
    session.commit()

    summary = run(resources, built.round_id)

    assert summary["excluded"] == [
        {
            "update_id": never.update_id,
            "client_id": never.client_id,
            "reason": f"client {never.client_id} has no cluster assignment",
        }
    ]
    (cluster,) = summary["clusters"]
    measured = ("clip_bound", "energy_kept", "seconds")
    assert 0 < cluster["energy_kept"] <= 1 + 1e-6 and cluster["seconds"] >= 0
    assert {k: v for k, v in cluster.items() if k not in measured} == {
        "label": 0,
        "updates": 2,
        "used": 2,
        "samples": 8,
        "clipped": 0,
        "noise_multiplier": None,
        "published": True,
        "reason": None,
    }


def test_scope_global_publishes_only_the_global_adapter(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    config = RoundConfig(scope="global", rank=3 * UPDATE_RANK)
    built = build_round(session, store, spec, config=config, clusters={0: [2, 3], None: [4]})

    summary = run(resources, built.round_id)

    assert [a["adapter"] for a in summary["adapters"]] == ["global"]
    adapter = published(session, store, "global", built.round_id)
    expected = {m: mean_delta(built.all(), m) for m in spec.modules}
    assert max_error(adapter, expected) < TOLERANCE
    assert session.scalar(select(func.count()).select_from(Adapter)) == 1


def test_fedavg_averages_factors_and_its_global_is_the_fedavg_of_all_updates(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    config = RoundConfig(method="fedavg", rank=UPDATE_RANK, lam=0.0)
    built = build_round(
        session, store, spec, config=config, clusters=TWO_CLUSTERS, centroids=CENTROIDS
    )

    summary = run(resources, built.round_id)

    assert summary["status"] == "published"
    for name, members in (
        ("cluster:0", built.members[0]),
        ("cluster:1", built.members[1]),
        ("global", built.all()),
    ):
        adapter = published(session, store, name, built.round_id)
        total = sum(m.samples for m in members)
        for key, value in adapter.tensors.items():
            want = sum(m.adapter.tensors[key].double() * m.samples for m in members) / total
            assert float((value.double() - want).abs().max()) < TOLERANCE, (name, key)
    assert summary["adapters"][2]["metrics"]["energy_kept"] is None


def test_rounds_not_aggregating_are_skipped(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    built = build_round(
        session, store, spec, config=RoundConfig(), clusters={0: [1]}, state=RoundState.COLLECTING
    )

    summary = run(resources, built.round_id)
    missing = run(resources, built.round_id + 1000)

    assert summary["status"] == "skipped" and "collecting" in summary["reason"]
    assert missing["status"] == "skipped"
    assert versions(session) == []


def test_a_failure_marks_the_round_failed_and_propagates(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    built = build_round(session, store, spec, config=RoundConfig(), clusters={0: [1]})
    session.get_one(Round, built.round_id).config = {"method": "median"}
    session.commit()

    with pytest.raises(ValueError, match="method"):
        run(resources, built.round_id)

    session.expire_all()
    round_row = session.get_one(Round, built.round_id)
    assert round_row.state is RoundState.FAILED
    assert round_row.error and round_row.error.startswith("ValidationError")


def test_the_task_retries_connection_errors_then_fails_the_round(
    session: Session,
    store: ObjectStore,
    resources: Resources,
    spec: LoraSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = build_round(session, store, spec, config=RoundConfig(), clusters={0: [1]})
    monkeypatch.setattr(context, "_resources", resources)
    calls: list[int] = []

    def flaky(round_id: int, **kwargs: Any) -> dict[str, Any]:
        calls.append(round_id)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return aggregate_round_now(round_id, **kwargs)

    monkeypatch.setattr(federation, "aggregate_or_flush", flaky)
    result = federation.aggregate_round.apply(args=(built.round_id,))
    assert result.get()["status"] == "published" and len(calls) == 3

    other = build_round(session, store, spec, config=RoundConfig(), clusters={0: [1]}, seed=50)
    calls.clear()

    def always_down(round_id: int, **kwargs: Any) -> dict[str, Any]:
        calls.append(round_id)
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(federation, "aggregate_or_flush", always_down)
    with pytest.raises(OperationalError):
        federation.aggregate_round.apply(args=(other.round_id,)).get()
    assert len(calls) == 1 + federation.MAX_RETRIES
    session.expire_all()
    round_row = session.get_one(Round, other.round_id)
    assert round_row.state is RoundState.FAILED and "gave up" in (round_row.error or "")


@pytest.mark.slow
def test_a_worker_runs_the_task_sent_by_name(
    session: Session, store: ObjectStore, spec: LoraSpec, settings: Settings, worker: None
) -> None:
    built = build_round(
        session, store, spec, config=RoundConfig(), clusters=TWO_CLUSTERS, centroids=CENTROIDS
    )
    app = make_celery(settings)
    try:
        result = app.send_task(
            TASK_AGGREGATE_ROUND, args=(built.round_id,), queue=AGGREGATION_QUEUE
        ).get(timeout=120)
    finally:
        app.close()

    assert result["status"] == "published"
    assert [name for name, _, _ in versions(session)] == ["cluster:0", "cluster:1", "global"]
    assert states(session, built.round_id)[0] is RoundState.PUBLISHED


def test_an_object_store_outage_leaves_the_round_aggregating_for_the_task_to_retry(
    session: Session, store: ObjectStore, resources: Resources, spec: LoraSpec
) -> None:
    built = build_round(session, store, spec, config=RoundConfig(), clusters={0: [1]})
    nothing_listens = ObjectStore(
        endpoint=f"127.0.0.1:{procs.free_port()}",
        bucket="tessera-test",
        access_key="key",
        secret_key="secret",
    )

    with pytest.raises(StorageUnavailableError):
        aggregate_round_now(
            built.round_id,
            sessions=resources.sessions,
            store=nothing_listens,
            redis=resources.redis,
            scales=ScaleRange(1e-3, 16.0),
        )

    assert isinstance(StorageUnavailableError("x"), TRANSIENT_ERRORS)
    assert states(session, built.round_id)[0] is RoundState.AGGREGATING
