"""SQLAlchemy tables: clients, task embeddings, rounds, updates, clusterings, adapters, jobs.

API schemas live in `tessera.schemas`; these classes are the storage shape only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


def _enum(enum_class: type[StrEnum], name: str) -> Enum:
    # Stored as plain strings (no native enum type) so the same migration runs on SQLite.
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Role(StrEnum):
    OPERATOR = "operator"
    DEVICE = "device"
    GENERATOR = "generator"


class RoundState(StrEnum):
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    PUBLISHED = "published"
    FAILED = "failed"
    CANCELLED = "cancelled"


class UpdateStatus(StrEnum):
    RECEIVED = "received"
    AGGREGATED = "aggregated"
    EXCLUDED = "excluded"


class AdapterKind(StrEnum):
    GLOBAL = "global"
    CLUSTER = "cluster"
    PERSONAL = "personal"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Client(Base):
    """An enrolled party: an edge device, an operator or a generation client."""

    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "client_role"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


class TaskEmbedding(Base):
    """One encoded task description of a device: a pooled, L2-normalised float32 vector."""

    __tablename__ = "task_embeddings"

    id: Mapped[int] = mapped_column(primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    dim: Mapped[int] = mapped_column(Integer)
    encoder_id: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_task_embeddings_client_id", "client_id"),)


class Round(Base):
    """A federated round: collects updates until quorum or deadline, then aggregates."""

    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    state: Mapped[RoundState] = mapped_column(_enum(RoundState, "round_state"))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    deadline: Mapped[datetime | None] = mapped_column(default=None)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(default=None)
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    clustering_id: Mapped[int | None] = mapped_column(
        ForeignKey("clusterings.id", ondelete="SET NULL"), default=None
    )
    error: Mapped[str | None] = mapped_column(String(2000), default=None)
    # What aggregation did per cluster (updates used, clipped, published or why not) and the
    # adapters it withheld; None until the worker has aggregated the round.
    report: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The last time a worker running it said it was alive, and how many runs a worker started
    # (the reaper queues it again when the heartbeat is older than TESSERA_TASK_STALE_S).
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the round loop deleted the round's raw update objects (their rows stay, for audit).
    updates_deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Update(Base):
    """A device's LoRA update for a round; the bytes live in the object store."""

    __tablename__ = "updates"

    id: Mapped[int] = mapped_column(primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    object_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    num_samples: Mapped[int] = mapped_column(Integer)
    base_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL"), default=None
    )
    train_loss: Mapped[float | None] = mapped_column(Float, default=None)
    status: Mapped[UpdateStatus] = mapped_column(_enum(UpdateStatus, "update_status"))
    exclusion_reason: Mapped[str | None] = mapped_column(String(500), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # 0 in a sync round (one update per device, replaced by a re-upload); in a buffered round,
    # a device's n-th update (one per local round).
    seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (UniqueConstraint("client_id", "round_id", "seq"),)


class Clustering(Base):
    """One versioned clustering of all task vectors, with its quality figures."""

    __tablename__ = "clusterings"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    algorithm: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


_ACTIVE_JOB = "state IN ('queued', 'running')"


class ClusteringJob(Base):
    """A re-clustering queued for a worker: asked by an operator, or by drift in the round loop."""

    __tablename__ = "clustering_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"))
    trigger: Mapped[str] = mapped_column(String(16))  # "operator" or "drift"
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The current clustering's version when the job was queued (None: there was none); the
    # round loop queues at most one drift job per version.
    base_version: Mapped[int | None] = mapped_column(Integer, default=None)
    clustering_id: Mapped[int | None] = mapped_column(
        ForeignKey("clusterings.id", ondelete="SET NULL"), default=None
    )
    error: Mapped[str | None] = mapped_column(String(2000), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # As for rounds: the worker's last sign of life, and how many runs a worker started.
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index("ix_clustering_jobs_state", "state"),
        # At most one job queued or running (migration 0008): the same constant for each.
        Index(
            "ux_clustering_jobs_one_active",
            text("(1)"),
            unique=True,
            sqlite_where=text(_ACTIVE_JOB),
            postgresql_where=text(_ACTIVE_JOB),
        ),
    )


class Cluster(Base):
    """A cluster of one clustering: its stable label and centroid."""

    __tablename__ = "clusters"

    id: Mapped[int] = mapped_column(primary_key=True)
    clustering_id: Mapped[int] = mapped_column(ForeignKey("clusterings.id", ondelete="CASCADE"))
    label: Mapped[int] = mapped_column(Integer)
    centroid: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)

    __table_args__ = (UniqueConstraint("clustering_id", "label"),)


class Assignment(Base):
    """A client's cluster in one clustering version."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(primary_key=True)
    clustering_id: Mapped[int] = mapped_column(ForeignKey("clusterings.id", ondelete="CASCADE"))
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    label: Mapped[int] = mapped_column(Integer)
    similarity: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("clustering_id", "client_id"),
        Index("ix_assignments_client_id", "client_id"),
    )


class Adapter(Base):
    """A named adapter line (`global`, `cluster:3`, `personal:7`) with many versions."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[AdapterKind] = mapped_column(_enum(AdapterKind, "adapter_kind"))
    cluster_label: Mapped[int | None] = mapped_column(Integer, default=None)
    client_id: Mapped[int | None] = mapped_column(
        ForeignKey("clients.id", ondelete="CASCADE"), default=None
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterVersion(Base):
    """One published version of an adapter; the LoRA file lives in the object store."""

    __tablename__ = "adapter_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    round_id: Mapped[int | None] = mapped_column(
        ForeignKey("rounds.id", ondelete="SET NULL"), default=None
    )
    object_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # 0 for a sync round's version; in a buffered round, the n-th flush of the adapter's buffer.
    flush: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        UniqueConstraint("adapter_id", "version"),
        # A round publishes each adapter at most once per flush, however often its task runs.
        UniqueConstraint("adapter_id", "round_id", "flush"),
    )


class GenerationJob(Base):
    """A generation request and its progress. Prompts and embeddings are never stored here."""

    __tablename__ = "generation_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    idempotency_key: Mapped[str | None] = mapped_column(String(128), default=None)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    input_key: Mapped[str | None] = mapped_column(String(512), default=None)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(String(2000), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # Queued jobs with the same key (mix, steps, guidance, size, prompt length; never split
    # jobs) can run as one UNet batch; None: always alone.
    batch_key: Mapped[str | None] = mapped_column(String(64), default=None)
    # The job whose run is also running this one (None: it runs itself).
    batch_leader: Mapped[str | None] = mapped_column(String(36), default=None)
    # The last time a worker running it said it was alive, and how many runs a worker started
    # (the reaper queues it again when the heartbeat is older than TESSERA_TASK_STALE_S).
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        UniqueConstraint("client_id", "idempotency_key"),
        Index("ix_generation_jobs_state_batch_key", "state", "batch_key"),
    )


class SecAggPhase(StrEnum):
    """Where one cluster's secure aggregation stands (`tessera.secagg.protocol`)."""

    KEYS = "keys"  # devices advertise their public keys (U1)
    SHARES = "shares"  # devices send sealed shares to every other device of U1 (U2)
    MASKED = "masked"  # devices send their masked inputs (U3)
    UNMASKING = "unmasking"  # survivors reveal the shares the server needs (U4)
    READY = "ready"  # enough reveals: the worker can unmask the cluster's sum
    FAILED = "failed"  # fewer devices than the threshold answered a phase in time


class SecAggGroup(Base):
    """One cluster's secure aggregation in a round: its frozen-A seed and its phase."""

    __tablename__ = "secagg_groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    label: Mapped[int] = mapped_column(Integer)
    a_seed: Mapped[int] = mapped_column(BigInteger)
    phase: Mapped[SecAggPhase] = mapped_column(_enum(SecAggPhase, "secagg_phase"))
    expected: Mapped[int] = mapped_column(Integer)  # the cluster's members when it started
    threshold: Mapped[int | None] = mapped_column(Integer, default=None)  # set once U1 is
    # When the phase started or last got an answer: it times out phase_s after that.
    waiting_since: Mapped[datetime] = mapped_column(default=utcnow)
    error: Mapped[str | None] = mapped_column(String(500), default=None)

    __table_args__ = (UniqueConstraint("round_id", "label"),)


class SecAggMember(Base):
    """A device in a secure group: public keys, share index, and how far it got.

    Its masked input (uniformly random mod 2^32 without the others') lives in the object store
    until the round is published; its reveal holds only the shares the server asked for.
    """

    __tablename__ = "secagg_members"

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("secagg_groups.id", ondelete="CASCADE"))
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    c_public: Mapped[bytes] = mapped_column(LargeBinary)
    s_public: Mapped[bytes] = mapped_column(LargeBinary)
    share_index: Mapped[int | None] = mapped_column(Integer, default=None)
    shared_at: Mapped[datetime | None] = mapped_column(default=None)
    masked_key: Mapped[str | None] = mapped_column(String(512), default=None)
    revealed: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("group_id", "client_id"),)


class SecAggShare(Base):
    """Shares one device sealed for another (AES-GCM under their agreed key): opaque here."""

    __tablename__ = "secagg_shares"

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("secagg_groups.id", ondelete="CASCADE"))
    sender_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    recipient_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (
        UniqueConstraint("group_id", "sender_id", "recipient_id"),
        Index("ix_secagg_shares_group_id_recipient_id", "group_id", "recipient_id"),
    )
