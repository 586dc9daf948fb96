"""The secure-aggregation messages between a device and the aggregator (JSON, bytes as base64)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from tessera.models import SecAggPhase
from tessera.schemas import RowId
from tessera.secagg.crypto import KEY_BYTES, NONCE_BYTES, SEED_BYTES

SEALED_BYTES = NONCE_BYTES + 16 + SEED_BYTES + KEY_BYTES + 16  # nonce, ids, b, s, GCM tag
MAX_GROUP = 10_000
MAX_B64_CHARS = 256


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _decode(value: object) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_B64_CHARS:
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def _length(length: int) -> Any:
    return Field(min_length=length, max_length=length, description=f"{length} bytes, base64")


_FROM_BASE64 = BeforeValidator(_decode)  # a 422 names the field, never the value
_AS_BASE64 = PlainSerializer(b64, return_type=str)
PublicKey = Annotated[bytes, _FROM_BASE64, _length(KEY_BYTES), _AS_BASE64]
SealedBytes = Annotated[bytes, _FROM_BASE64, _length(SEALED_BYTES), _AS_BASE64]
SeedShare = Annotated[bytes, _FROM_BASE64, _length(SEED_BYTES), _AS_BASE64]
KeyShare = Annotated[bytes, _FROM_BASE64, _length(KEY_BYTES), _AS_BASE64]


class KeysIn(BaseModel):
    """A device's two X25519 public keys: c seals shares, s agrees masks."""

    model_config = ConfigDict(extra="forbid")

    c_public: PublicKey
    s_public: PublicKey


class SealedShareIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipient_id: RowId
    sealed: SealedBytes


class SharesIn(BaseModel):
    """The sealed shares of a device for every other device of U1."""

    model_config = ConfigDict(extra="forbid")

    shares: Annotated[list[SealedShareIn], Field(max_length=MAX_GROUP)]


class SealedShareOut(BaseModel):
    sender_id: int
    sealed: str  # base64


class RevealIn(BaseModel):
    """A survivor's shares: of b for each device of U3, of s for each of U2 \\ U3."""

    model_config = ConfigDict(extra="forbid")

    b_shares: Annotated[dict[RowId, SeedShare], Field(max_length=MAX_GROUP)]
    s_shares: Annotated[dict[RowId, KeyShare], Field(max_length=MAX_GROUP)]


class PeerOut(BaseModel):
    client_id: int
    index: int
    c_public: str  # base64
    s_public: str  # base64


class DeviceProgress(BaseModel):
    keys: bool
    shares: bool
    masked: bool
    revealed: bool


class SecAggStateOut(BaseModel):
    """One device's view of its cluster's secure aggregation in a round."""

    round_id: int
    label: int
    phase: SecAggPhase
    phase_deadline: datetime | None
    error: str | None
    a_seed: int = Field(description="every device derives the frozen A per module from it")
    rank: int
    alpha: float
    threshold: int
    value_range: float
    clip_norm: float | None
    weighting: str
    sample_cap: int
    vector_length: int = Field(description="uint32 values of a masked input: B values, weight")
    peers: list[PeerOut] = Field(description="U1 with share indexes, once the keys phase ended")
    shared: list[int] = Field(description="U2, once the shares phase ended")
    masked: list[int] = Field(description="U3, once the masked phase ended")
    you: DeviceProgress
