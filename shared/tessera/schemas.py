"""Pydantic request and response models shared by the services, the SDK and the CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from tessera.federation import RoundConfig
from tessera.models import AdapterKind, Role, RoundState

MAX_ROW_ID = 2**31 - 1
RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]
"""A table row's id, as a path parameter or a field: the tables' integer keys are 32-bit on
PostgreSQL, so a larger id is a 422 rather than a database error."""


class Strict(BaseModel):
    """Base for request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


ClientName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class ClientCreate(Strict):
    name: ClientName
    role: Role = Role.DEVICE


class ClientPatch(Strict):
    disabled: bool


class ClientOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    created_at: datetime
    disabled: bool


class ClientWithToken(ClientOut):
    """Returned once, at enrolment or rotation: the token is not stored in clear anywhere."""

    token: str


def as_utc(value: datetime) -> datetime:
    """`value` in UTC: SQLite hands back naive datetimes, and every stored one is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
"""A datetime sent with its UTC offset, whatever the database returned."""

MAX_TASK_VECTORS = 32
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class TaskVectorsIn(Strict):
    """A device's encoded task descriptions: pooled, L2-normalised text-encoder vectors."""

    encoder_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    vectors: Annotated[list[list[FiniteFloat]], Field(min_length=1, max_length=MAX_TASK_VECTORS)]


class AdapterVersionOut(BaseModel):
    """One published version of an adapter (`global`, `cluster:3`, `personal:7`)."""

    name: str
    version: int
    version_id: int
    round_id: int | None
    sha256: str
    size_bytes: int
    rank: int
    metrics: dict[str, Any]
    created_at: UtcDatetime


class AdapterDownload(AdapterVersionOut):
    """A version with a presigned URL that downloads its LoRA file without credentials."""

    download_url: str
    url_expires_at: UtcDatetime


class AdapterOut(BaseModel):
    """An adapter line and its latest version, if any was published."""

    name: str
    kind: AdapterKind
    cluster_label: int | None
    client_id: int | None
    versions: int
    latest: AdapterVersionOut | None


class RoundBrief(BaseModel):
    """What a device needs to know of a round to take part in it."""

    id: int
    number: int
    state: RoundState
    deadline: UtcDatetime | None
    config: RoundConfig


class ClusterProgress(BaseModel):
    """Members of one cluster (in the round's clustering) and how many of them uploaded."""

    label: int
    members: int
    updates: int


class ExcludedUpdate(BaseModel):
    """An update left out of the round's aggregates (by the worker or an operator), and why."""

    update_id: int
    client_id: int
    reason: str


class DeviceEpsilon(BaseModel):
    """One device's privacy loss after a private round."""

    client_id: int
    rounds: int = Field(description="private rounds it uploaded to, up to this one included")
    epsilon: float = Field(description="its epsilon at the round's delta after those rounds")


class RoundPrivacy(BaseModel):
    """A private round's mechanism and what it cost each device that took part."""

    noise_multiplier: float = Field(description="noise std on each cluster's sum, in clip norms")
    clip_norm: float = Field(description="the fixed bound on each update's ||scale·B·A||_F")
    delta: float
    epsilon_budget: float | None = Field(description="each device's budget; none: unbounded")
    max_epsilon: float = Field(description="the largest epsilon among the devices shown")
    devices: list[DeviceEpsilon] = Field(
        description="each device that uploaded (a device: its own)"
    )
    accountant: str
    assumptions: str


class RoundOut(RoundBrief):
    """A round with its progress towards quorum and, once published, its adapter versions."""

    opened_at: UtcDatetime
    closed_at: UtcDatetime | None
    published_at: UtcDatetime | None
    clustering_id: int | None
    error: str | None
    updates: int = Field(description="updates that count: received or aggregated, not excluded")
    clusters: list[ClusterProgress]
    unassigned_updates: int = Field(description="updates from devices outside the clustering")
    quorum_met: bool
    published: list[AdapterVersionOut]
    excluded: list[ExcludedUpdate] = Field(
        default_factory=list,
        description="updates left out at aggregation, with the reason (a device sees its own)",
    )
    report: dict[str, Any] | None = Field(
        default=None,
        description="operators only: per cluster, the updates used and clipped, the clip bound, "
        "whether its adapter was published or why not; adapters withheld",
    )
    heartbeat_at: UtcDatetime | None = Field(
        default=None, description="when a worker aggregating it last said it was alive"
    )
    attempts: int = Field(default=0, description="aggregation runs a worker started")
    privacy: RoundPrivacy | None = Field(
        default=None, description="a private round's noise and each device's epsilon after it"
    )
    updates_deleted_at: UtcDatetime | None = Field(
        default=None,
        description="when its raw update objects were deleted (TESSERA_UPDATE_RETENTION_DAYS "
        "after it was published or cancelled); their rows, reasons and report stay",
    )


ExclusionReason = Annotated[
    str,
    StringConstraints(min_length=1, max_length=300, pattern=r"^[^\x00-\x1f\x7f]+$"),
]


class ExclusionCreate(Strict):
    """An operator's exclusion of one device's update from a collecting round."""

    client_id: RowId
    reason: ExclusionReason = Field(description="shown on the round beside the exclusion")


class ClientRemoved(BaseModel):
    """What removing a client deleted: its rows and its objects in the store."""

    client_id: int
    task_vectors: int
    updates: int
    assignments: int
    adapters: int
    generation_jobs: int
    objects: int


class DeviceAssignment(BaseModel):
    """A device's cluster, the adapter to start training from, and the round to upload to."""

    client_id: int
    cluster: int | None
    clustering_version: int | None
    similarity: float | None
    start_adapter: AdapterDownload | None
    current_round: RoundBrief | None


class TaskVectorsStored(BaseModel):
    """How many vectors were kept, and the assignment they led to (None: not assigned yet)."""

    stored: int
    assignment: DeviceAssignment | None


class UpdateReceipt(BaseModel):
    """A stored LoRA update; `replaced` when it took the place of an earlier upload."""

    update_id: int
    round_id: int
    client_id: int
    sha256: str
    size_bytes: int
    num_samples: int
    replaced: bool
    round_state: RoundState


class UpdateRejection(BaseModel):
    """Why a LoRA file was refused: the offending key ("" for the file as a whole) and what was
    expected. What was found is left out: errors never echo the input."""

    detail: str
    key: str
    expected: Any


MAX_NUM_SAMPLES = 1_000_000  # training samples one update may claim
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]


class UploadSlotCreate(Strict):
    """The update a device is about to send straight to the object store."""

    size: Annotated[int, Field(ge=1, description="the file's size in bytes")]
    sha256: Annotated[Sha256Hex, Field(description="the file's sha256, hex")]


class UploadPartOut(BaseModel):
    number: int
    size: int = Field(description="bytes this part must have")
    url: str | None = Field(description="where to PUT it (presigned); null once it is held")


class UploadSlotOut(BaseModel):
    """An upload slot: PUT each part still missing to its URL, then commit."""

    slot: str = Field(description="the slot's token, for its status and commit paths")
    size: int
    sha256: str
    part_bytes: int
    parts: list[UploadPartOut] = Field(description="every part, by number")
    missing: int = Field(description="parts not yet held by the object store")
    expires_at: datetime


class UploadCommit(Strict):
    """The facts of a direct upload's query, for an update sent through a slot."""

    num_samples: Annotated[int, Field(ge=1, le=MAX_NUM_SAMPLES)]
    base_version_id: RowId | None = None
    train_loss: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None
