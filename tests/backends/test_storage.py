"""The object store against a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import io
import time
import tracemalloc

import httpx
import pytest

from tessera.storage import ChecksumMismatchError, ObjectNotFoundError, ObjectStore

MiB = 1024 * 1024


class PatternStream(io.RawIOBase):
    """`size` bytes of a repeating pseudo-random pattern, produced on demand (never whole)."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.block = hashlib.sha256(b"tessera").digest() * 2048  # 64 KiB
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        size = self.remaining if size is None or size < 0 else min(size, self.remaining)
        out = bytearray()
        while len(out) < size:
            out += self.block[: size - len(out)]
        self.remaining -= size
        chunk = bytes(out)
        self.digest.update(chunk)
        return chunk


def test_bytes_round_trip(store: ObjectStore) -> None:
    data = b"lora bytes " * 1000

    stored = store.put_bytes("tests/roundtrip.bin", data)
    read = store.get_bytes("tests/roundtrip.bin", expected_sha256=stored.sha256)

    assert read == data
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()


def test_fifty_megabytes_stream_through_with_bounded_memory(store: ObjectStore) -> None:
    size = 50 * MiB
    source = PatternStream(size)

    tracemalloc.start()
    stored = store.put_stream("tests/big.bin", source, length=size)
    _, upload_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    digest = hashlib.sha256()
    received = 0
    for chunk in store.iter_chunks("tests/big.bin"):
        digest.update(chunk)
        received += len(chunk)
    _, download_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert stored.size == size == received
    assert stored.sha256 == source.digest.hexdigest() == digest.hexdigest()
    # One multipart part (8 MiB) and its copies, never the 50 MiB object.
    assert upload_peak < 30 * MiB, f"upload peak {upload_peak / MiB:.1f} MiB"
    assert download_peak < 8 * MiB, f"download peak {download_peak / MiB:.1f} MiB"


def test_stream_of_unknown_length(store: ObjectStore) -> None:
    source = PatternStream(7 * MiB)

    stored = store.put_stream("tests/unknown-length.bin", source, length=-1)

    assert stored.size == 7 * MiB
    assert store.get_bytes("tests/unknown-length.bin") == _pattern_bytes(7 * MiB)


def _pattern_bytes(size: int) -> bytes:
    return PatternStream(size).read(size)


def test_wrong_checksum_on_write_keeps_nothing(store: ObjectStore) -> None:
    wrong = "0" * 64

    with pytest.raises(ChecksumMismatchError) as raised:
        store.put_bytes("tests/corrupt.bin", b"payload", expected_sha256=wrong)

    assert raised.value.expected == wrong
    assert raised.value.found == hashlib.sha256(b"payload").hexdigest()
    assert not store.exists("tests/corrupt.bin")


def test_corrupted_object_is_detected_on_read(store: ObjectStore) -> None:
    original = store.put_bytes("tests/tampered.bin", b"original content")
    store.put_bytes("tests/tampered.bin", b"tampered content")

    with pytest.raises(ChecksumMismatchError):
        store.get_bytes("tests/tampered.bin", expected_sha256=original.sha256)


def test_missing_object_is_a_clear_error(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError, match=r"no object 'tests/absent\.bin'"):
        store.get_bytes("tests/absent.bin")


def test_presigned_url_downloads_without_credentials_then_expires(store: ObjectStore) -> None:
    store.put_bytes("tests/presigned.bin", b"adapter")

    url = store.presigned_get_url("tests/presigned.bin", expires_s=2)
    fresh = httpx.get(url)
    time.sleep(3)
    expired = httpx.get(url)

    assert fresh.status_code == 200
    assert fresh.content == b"adapter"
    assert expired.status_code == 403


def test_list_and_delete(store: ObjectStore) -> None:
    for name in ("a", "b"):
        store.put_bytes(f"tests/listing/{name}", b"x")

    listed = store.list_keys("tests/listing/")
    store.delete("tests/listing/a")

    assert listed == ["tests/listing/a", "tests/listing/b"]
    assert store.list_keys("tests/listing/") == ["tests/listing/b"]
