"""The federation's shared vocabulary: round configuration, adapter names and object keys.

The aggregator writes what the worker reads through these, so both agree on one spelling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

GLOBAL_ADAPTER = "global"
CLUSTER_PREFIX = "cluster:"
PERSONAL_PREFIX = "personal:"

MIN_TEMPERATURE = 1e-3
Temperature = Annotated[float, Field(ge=MIN_TEMPERATURE, le=100.0, allow_inf_nan=False)]
"""A softmax temperature over cosine similarities: at least 1e-3, so that cosine / temperature
stays far from overflowing (a subnormal one makes every weight NaN)."""


class SecureAggregation(BaseModel):
    """How a round in secure mode (`method: secure`) masks and sums each cluster's inputs."""

    model_config = ConfigDict(extra="forbid")

    threshold: Annotated[int | None, Field(ge=2, le=10_000)] = Field(
        default=None,
        description="t: devices that must answer every phase after the keys (below it the "
        "cluster fails); default more than half of those that sent keys. Devices refuse a t "
        "of half or less: a server could then rebuild both secrets of one device",
    )
    value_range: Annotated[float, Field(gt=0, le=1e3, allow_inf_nan=False)] = Field(
        default=1.0, description="each weighted B value is clipped to [-value_range, value_range]"
    )
    clip_norm: Annotated[float | None, Field(gt=0, le=1e4, allow_inf_nan=False)] = Field(
        default=None, description="devices scale B so that ||scale·B·A||_F <= clip_norm"
    )
    alpha: Annotated[float | None, Field(gt=0, le=1e4, allow_inf_nan=False)] = Field(
        default=None, description="the LoRA alpha every device trains with (default: the rank)"
    )
    sample_cap: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=64, description="weighting samples: a device weighs min(samples, cap) / cap"
    )
    phase_s: Annotated[float, Field(gt=0, le=24 * 3600, allow_inf_nan=False)] = Field(
        default=60.0,
        description="how long a phase waits for the next answer of the cluster's devices",
    )


class RoundConfig(BaseModel):
    """How a round collects and aggregates; stored as JSON on the round."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["exact", "fedavg", "secure"] = Field(
        default="exact",
        description="exact: mean of B·A, re-factorised by SVD; fedavg: mean of A and of B; "
        "secure: A frozen per cluster from a seed, devices send masked B, the server unmasks "
        "only each cluster's sum (docs/secure_aggregation.md)",
    )
    scope: Literal["cluster", "global"] = Field(
        default="cluster",
        description="cluster: one adapter per cluster plus a global one; global: one for everyone",
    )
    rank: Annotated[int, Field(ge=1, le=64)] = 8
    power_passes: Annotated[int, Field(ge=0, le=8)] = Field(
        default=1,
        description="exact, beyond the summed rank the stacked path solves exactly (256): the "
        "sketch's power passes, each one more read of the stored factors. Updates that share "
        "directions (a cluster's) are within 1e-3 of the best rank-r truncation at 1; updates "
        "that share none leave it ill-conditioned, and more passes bring the result nearer its "
        "residual (docs/bench_aggregation.md)",
    )
    min_updates: Annotated[int, Field(ge=1, le=100_000)] = 1
    min_updates_per_cluster: Annotated[int, Field(ge=0, le=100_000)] = 0
    deadline_s: Annotated[float | None, Field(gt=0, le=7 * 24 * 3600, allow_inf_nan=False)] = None
    lam: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = Field(
        default=0.2,
        description="the most each cluster adapter takes from its neighbours (0: off); a "
        "neighbour's part is lam times its softmax share, the cluster itself included",
    )
    temperature: Temperature = Field(
        default=0.1,
        description="softmax temperature over centroid cosine similarity (at 0.1, of two "
        "clusters, a neighbour at cosine 0.6 gets 2% of lam, a near twin half)",
    )
    weighting: Literal["samples", "equal"] = Field(
        default="samples",
        description="samples: each update weighs its sample count, capped at max_weight_ratio "
        "times the cluster's median count; equal: every update weighs the same",
    )
    max_weight_ratio: Annotated[float, Field(ge=1.0, le=1000.0, allow_inf_nan=False)] = Field(
        default=2.0, description="cap of a sample-weighted update, in cluster medians"
    )
    staleness_exponent: Annotated[float, Field(ge=0.0, le=4.0, allow_inf_nan=False)] = Field(
        default=0.0,
        description="an update trained from an adapter version s versions older than that "
        "adapter's newest weighs (1 + s) ** -staleness_exponent times its weight (FedBuff's "
        "polynomial staleness); 0: off",
    )
    mode: Literal["sync", "buffered"] = Field(
        default="sync",
        description="sync: the round collects, then aggregates once; buffered: each cluster "
        "publishes a new version every buffer_k updates while the round collects (devices "
        "upload once per local round, from the newest version), until buffer_versions "
        "versions are out (docs/bench_stragglers.md)",
    )
    buffer_k: Annotated[int | None, Field(ge=1, le=10_000)] = Field(
        default=None, description="buffered: a cluster's updates aggregated into each version"
    )
    buffer_versions: Annotated[int | None, Field(ge=1, le=10_000)] = Field(
        default=None,
        description="buffered: the round is published once it has published this many "
        "versions, all clusters together",
    )
    clip: Literal["adaptive", "fixed"] = Field(
        default="adaptive",
        description="bound on each update's ||scale·B·A||_F: adaptive, clip_multiplier times "
        "the cluster's median norm; fixed, clip_norm",
    )
    clip_multiplier: Annotated[float, Field(ge=0.1, le=100.0, allow_inf_nan=False)] = Field(
        default=2.0, description="adaptive clip: the bound in medians of the cluster's norms"
    )
    clip_norm: Annotated[float | None, Field(gt=0, le=1e4, allow_inf_nan=False)] = Field(
        default=None, description="fixed clip: the bound on ||scale·B·A||_F (needs clip fixed)"
    )

    robust: Literal["none", "norm", "trimmed", "krum"] = Field(
        default="none",
        description="robust selection before aggregating: norm drops the updates whose norm "
        "is over robust_norm_ratio times the cluster's median; on sketches of the products, "
        "trimmed drops the robust_trim share farthest from the cluster's median and krum keeps "
        "the n - robust_f updates with the lowest Multi-Krum scores",
    )
    robust_norm_ratio: Annotated[float, Field(ge=1.0, le=1000.0, allow_inf_nan=False)] = Field(
        default=3.0, description="norm: the largest norm kept, in medians of the cluster's norms"
    )
    robust_trim: Annotated[float, Field(ge=0.0, le=0.45, allow_inf_nan=False)] = Field(
        default=0.2, description="trimmed: share of a cluster's updates dropped (rounded down)"
    )
    robust_f: Annotated[int, Field(ge=0, le=10_000)] = Field(
        default=1, description="krum: attackers assumed per cluster (n - f updates kept)"
    )

    noise_multiplier: Annotated[float | None, Field(ge=0.1, le=1000.0, allow_inf_nan=False)] = (
        Field(
            default=None,
            description="differential privacy: Gaussian noise of std noise_multiplier·clip_norm "
            "on each cluster's sum of clipped products (needs method exact, clip fixed, "
            "weighting equal, robust none); none: the federation's TESSERA_DP_NOISE_MULTIPLIER",
        )
    )

    secure: SecureAggregation = Field(
        default_factory=SecureAggregation, description="secure mode's settings (method secure)"
    )

    @model_validator(mode="after")
    def _clip_norm_with_fixed(self) -> RoundConfig:
        if (self.clip == "fixed") != (self.clip_norm is not None):
            raise ValueError("clip_norm is required with clip 'fixed' and only then")
        return self

    @model_validator(mode="after")
    def _private_rounds_bound_each_update(self) -> RoundConfig:
        if self.noise_multiplier is None:
            return self
        needs = {
            "method": "exact",
            "clip": "fixed",
            "weighting": "equal",
            "robust": "none",
            "staleness_exponent": 0.0,
        }
        wrong = [f"{name} {want!r}" for name, want in needs.items() if getattr(self, name) != want]
        if wrong:
            raise ValueError(
                "a differentially private round (noise_multiplier) needs "
                + ", ".join(wrong)
                + ": its sensitivity is one fixed clip_norm per update, counted once, "
                "whichever other updates arrive"
            )
        return self

    @property
    def private(self) -> bool:
        """True when the round adds Gaussian noise to each cluster's aggregate."""
        return self.noise_multiplier is not None

    @model_validator(mode="after")
    def _secure_is_linear(self) -> RoundConfig:
        # The server sees only each cluster's sum: it cannot blend, select or clip per update.
        if self.method == "secure" and (
            self.scope != "cluster"
            or self.lam != 0
            or self.robust != "none"
            or self.staleness_exponent != 0
        ):
            raise ValueError(
                "method 'secure' needs scope 'cluster', lam 0 and robust 'none', and "
                "staleness_exponent 0"
            )
        return self

    @model_validator(mode="after")
    def _buffered_needs_its_sizes(self) -> RoundConfig:
        buffered = self.mode == "buffered"
        sized = self.buffer_k is not None and self.buffer_versions is not None
        if buffered and not sized:
            raise ValueError("mode 'buffered' needs buffer_k and buffer_versions")
        if not buffered and (self.buffer_k is not None or self.buffer_versions is not None):
            raise ValueError("buffer_k and buffer_versions are for mode 'buffered' only")
        # A flush aggregates one cluster's buffer: no other cluster's new adapter to blend with,
        # and noise or masks calibrated for a whole round's updates.
        if buffered and (self.method == "secure" or self.private or self.lam != 0):
            raise ValueError(
                "mode 'buffered' needs method 'exact' or 'fedavg', lam 0 and no noise_multiplier"
            )
        if buffered and self.min_updates_per_cluster > (self.buffer_k or 0):
            raise ValueError("mode 'buffered' needs min_updates_per_cluster at most buffer_k")
        return self

    @property
    def buffered(self) -> bool:
        """True when each cluster publishes a version every buffer_k updates."""
        return self.mode == "buffered"

    @property
    def secure_alpha(self) -> float:
        """The LoRA alpha of every update in secure mode."""
        return float(self.rank) if self.secure.alpha is None else self.secure.alpha


def cluster_adapter_name(label: int) -> str:
    """`cluster:3`."""
    return f"{CLUSTER_PREFIX}{label}"


def personal_adapter_name(client_id: int) -> str:
    """`personal:7`."""
    return f"{PERSONAL_PREFIX}{client_id}"


UPDATES_PREFIX = "updates/"


def update_prefix(round_id: int) -> str:
    """Where a round's updates live in the object store: `updates/round-7/`."""
    return f"{UPDATES_PREFIX}round-{round_id}/"


def update_key(round_id: int, client_id: int, sha256: str) -> str:
    """Where a device's update for a round lives in the object store: content-addressed, so a
    re-upload never overwrites the update it replaces before the replacement is committed."""
    return f"{update_prefix(round_id)}client-{client_id}/{sha256}.safetensors"


def masked_input_key(round_id: int, label: int, client_id: int) -> str:
    """Where a device's masked input (secure mode) waits for the unmasking of its cluster's sum;
    deleted once the round is published."""
    return f"secagg/round-{round_id}/cluster-{label}/client-{client_id}.u32"


def staged_update_key(round_id: int, client_id: int, nonce: str) -> str:
    """Where an update sent straight to the object store through an upload slot lands: a key
    of its own per slot, so that an upload never touches the accepted update's object."""
    return f"{UPDATES_PREFIX}round-{round_id}/client-{client_id}/upload-{nonce}.safetensors"


def adapter_key(adapter_name: str, round_id: int, flush: int = 0) -> str:
    """Where the version of an adapter published by a round (by its `flush`-th flush, in a
    buffered round) lives: fixed per round and flush, so a rerun of the aggregation overwrites
    the same object instead of leaving a second copy."""
    name = adapter_name.replace(":", "-")
    return f"adapters/{name}/round-{round_id}{f'-flush-{flush}' if flush else ''}.safetensors"


VECTOR_DTYPE = np.dtype("<f4")


def task_vector_bytes(vector: Sequence[float] | np.ndarray) -> bytes:
    """A task vector (or centroid) as the database stores it: little-endian float32, no header."""
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


def task_vector_from_bytes(data: bytes, *, dim: int | None = None) -> np.ndarray:
    """A stored float32 vector as float64, refused when its length disagrees with `dim`."""
    if len(data) % VECTOR_DTYPE.itemsize:
        raise ValueError(f"a stored vector has {len(data)} bytes, not a multiple of 4")
    vector = np.frombuffer(data, dtype=VECTOR_DTYPE).astype(np.float64)
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(f"a stored vector has {vector.shape[0]} values, its row says dim={dim}")
    return vector


# The error a round is cancelled with when its deadline passes before any update arrived.
NO_UPDATES_AT_DEADLINE = "deadline passed with no updates"
