"""Upload slots: a device sends a large update straight to the object store, then commits it.

A slot is a multipart upload to a staging key of the device's round (`staged_update_key`) and
the facts the server will hold the upload to (size, sha256, part size, expiry), signed under
the token secret: the server keeps no state for it, and a slot it did not sign, or another
device's, is unknown. The device PUTs each part through a presigned URL; the parts the store
holds can be listed at any time, so an interrupted upload continues where it stopped. On commit
the server joins the parts, validates the object as it streams it back (header first, the same
checks as a direct upload) and counts it, or deletes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
import time
from dataclasses import asdict, dataclass

from tessera.federation import staged_update_key
from tessera.storage import ObjectStore, UploadedPart

_SCOPE = b"tessera.upload-slot:"


class UnknownSlotError(Exception):
    """A slot this server did not sign, for another device or round, or malformed."""


class ExpiredSlotError(Exception):
    """A slot past its expiry."""

    def __init__(self, slot: UploadSlot) -> None:
        super().__init__("upload slot expired")
        self.slot = slot


@dataclass(frozen=True)
class UploadSlot:
    """What a slot binds: where the parts go, what their whole must be, and until when."""

    round_id: int
    client_id: int
    key: str
    upload_id: str
    size: int
    sha256: str
    part_bytes: int
    expires_at: int  # unix seconds

    @property
    def part_count(self) -> int:
        return max(1, math.ceil(self.size / self.part_bytes))

    def part_size(self, number: int) -> int:
        """The size part `number` (from 1) must have: `part_bytes`, less for the last."""
        return min(self.part_bytes, self.size - (number - 1) * self.part_bytes)

    def missing(self, parts: list[UploadedPart]) -> list[int]:
        """Numbers of the parts not yet held whole (a part of the wrong size counts as missing)."""
        held = {part.number for part in parts if part.size == self.part_size(part.number)}
        return [n for n in range(1, self.part_count + 1) if n not in held]


def open_slot(
    *,
    store: ObjectStore,
    round_id: int,
    client_id: int,
    size: int,
    sha256: str,
    part_bytes: int,
    expiry_s: int,
) -> UploadSlot:
    """Begin the multipart upload of a new slot."""
    key = staged_update_key(round_id, client_id, secrets.token_hex(8))
    return UploadSlot(
        round_id=round_id,
        client_id=client_id,
        key=key,
        upload_id=store.start_multipart(key),
        size=size,
        sha256=sha256.lower(),
        part_bytes=part_bytes,
        expires_at=int(time.time()) + expiry_s,
    )


def sign_slot(slot: UploadSlot, *, secret: str) -> str:
    """The slot as an opaque, URL-safe token."""
    payload = base64.urlsafe_b64encode(json.dumps(asdict(slot)).encode()).rstrip(b"=")
    return f"{payload.decode()}.{_mac(payload, secret)}"


def read_slot(token: str, *, secret: str, round_id: int, client_id: int) -> UploadSlot:
    """The slot a token carries: UnknownSlotError unless this server signed it for this round and
    device, ExpiredSlotError past its expiry."""
    payload, _, mac = token.partition(".")
    if not hmac.compare_digest(_mac(payload.encode(), secret), mac):
        raise UnknownSlotError
    try:
        fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        slot = UploadSlot(**fields)
    except (binascii.Error, ValueError, TypeError) as error:
        raise UnknownSlotError from error
    if slot.round_id != round_id or slot.client_id != client_id:
        raise UnknownSlotError
    if time.time() >= slot.expires_at:
        raise ExpiredSlotError(slot)
    return slot


def _mac(payload: bytes, secret: str) -> str:
    digest = hmac.new(secret.encode(), _SCOPE + payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
