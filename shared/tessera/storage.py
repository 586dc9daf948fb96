"""The object store, over the S3 API: the only module that imports `minio`.

Objects are written once under unique keys and found through the database, so a write that
fails its checksum is deleted before anything refers to it. Every failure of the server or of
the connection to it comes out as a `StorageError`; the transient ones (connection refused or
reset, timeouts, 5xx answers) as `StorageUnavailableError`, which callers retry.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO, cast

import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import MinioException, S3Error

from tessera.config import Settings

CHUNK_BYTES = 1024 * 1024
# Multipart part size: the most an upload holds in memory at once (S3's minimum is 5 MiB).
PART_BYTES = 8 * 1024 * 1024
CONNECT_TIMEOUT_S = 2.0
# Between two reads of one answer, not for the whole transfer. Workers wait READ_TIMEOUT_S and
# read once more; a process that answers requests (`quick`) waits QUICK_READ_TIMEOUT_S once, so
# a hung S3 server is a 503 within a few seconds (it was 40 s).
READ_TIMEOUT_S = 20.0
QUICK_READ_TIMEOUT_S = 4.0
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchUpload"})
# S3 error codes of a server that is overloaded or failing, not of a bad request.
_SERVER_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})


@contextmanager
def _failures(what: str, *, missing: str = "no such object") -> Iterator[None]:
    """Turn every error of the S3 client or its connection into a StorageError naming `what`."""
    try:
        yield
    except S3Error as error:
        if error.code in _NOT_FOUND:
            raise ObjectNotFoundError(missing) from error
        status = error.response.status if error.response is not None else 0
        if error.code in _SERVER_CODES or status >= 500:
            raise StorageUnavailableError(f"{what}: {error}") from error
        raise StorageError(f"{what}: {error}") from error
    except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
        # ServerError/InvalidResponseError (a 5xx or a non-S3 answer), refused or reset
        # connections, timeouts, retries exhausted by the pool.
        raise StorageUnavailableError(f"{what}: {type(error).__name__}: {error}") from error


class StorageError(Exception):
    """The object store refused or failed an operation."""


class ObjectNotFoundError(StorageError):
    pass


class StorageUnavailableError(StorageError):
    """The object store did not answer, or answered with a server error: worth a retry."""


class ChecksumMismatchError(StorageError):
    def __init__(self, key: str, expected: str, found: str) -> None:
        super().__init__(f"sha256 of {key!r} is {found}, expected {expected}; nothing was kept")
        self.key, self.expected, self.found = key, expected, found


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class UploadedPart:
    """A part of a multipart upload that the object store holds."""

    number: int
    etag: str
    size: int


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """A multipart upload begun and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: datetime | None


class _HashingReader(io.RawIOBase):
    """Wraps a stream, hashing and counting what is read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        chunk = self._stream.read(-1 if size is None else size)
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk


class ObjectStore:
    """Bytes and streams in one bucket, checked by sha256."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str = "us-east-1",
        public_endpoint: str | None = None,
        quick: bool = False,
    ) -> None:
        # A server that hangs costs at most two reads of READ_TIMEOUT_S (one retry), not four
        # of a minute; `quick`, one read of QUICK_READ_TIMEOUT_S.
        read_timeout = QUICK_READ_TIMEOUT_S if quick else READ_TIMEOUT_S
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=read_timeout),
            maxsize=16,
            retries=urllib3.Retry(
                total=3,
                read=0 if quick else 1,
                backoff_factor=0.2,
                status_forcelist=[502, 503, 504],
            ),
        )
        self.bucket = bucket
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        # Presigned URLs are signed for the host the client will use; no request is sent.
        self._presigner = Minio(
            public_endpoint or endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, quick: bool = False) -> ObjectStore:
        """The store `settings` names; `quick` for a process that answers requests."""
        if not settings.s3_endpoint:
            raise StorageError(
                "TESSERA_S3_ENDPOINT is not set: configure an S3 server, or start the stack "
                "with `tessera up`, which starts an embedded one"
            )
        return cls(
            endpoint=settings.s3_endpoint,
            bucket=settings.s3_bucket,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            public_endpoint=settings.s3_public_endpoint,
            quick=quick,
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (called at start-up)."""
        try:
            with _failures(f"cannot create bucket {self.bucket!r}"):
                if not self._client.bucket_exists(self.bucket):
                    self._client.make_bucket(self.bucket)
        except StorageError as error:
            code = getattr(error.__cause__, "code", None)
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put_bytes(
        self, key: str, data: bytes, *, expected_sha256: str | None = None
    ) -> StoredObject:
        return self.put_stream(
            key, io.BytesIO(data), length=len(data), expected_sha256=expected_sha256
        )

    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        *,
        length: int = -1,
        expected_sha256: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> StoredObject:
        """Stream `stream` to `key`, at most one part in memory; delete it again on a bad sha256."""
        reader = _HashingReader(stream)
        with _failures(f"cannot write {key!r}"):
            self._client.put_object(
                self.bucket,
                key,
                cast(BinaryIO, reader),
                length=length,
                part_size=PART_BYTES,
                num_parallel_uploads=1,
                content_type=content_type,
            )
        found = reader.digest.hexdigest()
        if expected_sha256 is not None and found != expected_sha256.lower():
            self.delete(key)
            raise ChecksumMismatchError(key, expected_sha256, found)
        return StoredObject(key=key, size=reader.size, sha256=found)

    def get_bytes(self, key: str, *, expected_sha256: str | None = None) -> bytes:
        buffer = io.BytesIO()
        digest = hashlib.sha256()
        for chunk in self.iter_chunks(key):
            digest.update(chunk)
            buffer.write(chunk)
        found = digest.hexdigest()
        if expected_sha256 is not None and found != expected_sha256.lower():
            raise ChecksumMismatchError(key, expected_sha256, found)
        return buffer.getvalue()

    def iter_chunks(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Generator[bytes, None, None]:
        """Stream an object's bytes in chunks."""
        missing = f"no object {key!r} in bucket {self.bucket!r}"
        with _failures(f"cannot read {key!r}", missing=missing):
            response = self._client.get_object(self.bucket, key)
        try:
            with _failures(f"cannot read {key!r}"):
                yield from response.stream(chunk_bytes)
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            with _failures(f"cannot stat {key!r}"):
                self._client.stat_object(self.bucket, key)
        except ObjectNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        with _failures(f"cannot delete {key!r}"):
            self._client.remove_object(self.bucket, key)

    def list_keys(self, prefix: str = "") -> list[str]:
        with _failures(f"cannot list {prefix!r}"):
            return [
                item.object_name
                for item in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if item.object_name is not None
            ]

    def list_modified(self, prefix: str = "") -> list[tuple[str, datetime]]:
        """(key, last modified) of every object under `prefix`."""
        return [
            (item.object_name, item.last_modified)
            for item in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            if item.object_name is not None and item.last_modified is not None
        ]

    def presigned_get_url(self, key: str, *, expires_s: int) -> str:
        """A URL that downloads `key` without credentials for `expires_s` seconds."""
        return self._presigner.presigned_get_object(
            self.bucket, key, expires=timedelta(seconds=expires_s)
        )

    def size_of(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFoundError where there is none."""
        missing = f"no object {key!r} in bucket {self.bucket!r}"
        with _failures(f"cannot stat {key!r}", missing=missing):
            size = self._client.stat_object(self.bucket, key).size
        return int(size or 0)

    # -- multipart uploads that clients send through presigned URLs ------------------------

    def start_multipart(self, key: str) -> str:
        """Begin a multipart upload to `key`; its upload id."""
        with _failures(f"cannot begin an upload to {key!r}"):
            return self._client._create_multipart_upload(
                self.bucket, key, {"Content-Type": "application/octet-stream"}
            )

    def presigned_part_url(self, key: str, *, upload_id: str, number: int, expires_s: int) -> str:
        """A URL through which a client PUTs part `number` of an upload without credentials."""
        return self._presigner.get_presigned_url(
            "PUT",
            self.bucket,
            key,
            expires=timedelta(seconds=expires_s),
            extra_query_params={"partNumber": str(number), "uploadId": upload_id},
        )

    def uploaded_parts(self, key: str, *, upload_id: str) -> list[UploadedPart]:
        """The parts the store holds for an upload, by number; ObjectNotFoundError once the
        upload is completed or aborted."""
        parts: list[UploadedPart] = []
        marker: str | None = None
        missing = f"no upload {upload_id!r} to {key!r}"
        while True:
            with _failures(f"cannot list the parts of {key!r}", missing=missing):
                listed = self._client._list_parts(
                    self.bucket, key, upload_id, part_number_marker=marker
                )
            parts.extend(UploadedPart(p.part_number, p.etag, p.size or 0) for p in listed.parts)
            if not listed.is_truncated or not listed.next_part_number_marker:
                return sorted(parts, key=lambda part: part.number)
            marker = listed.next_part_number_marker

    def complete_multipart(self, key: str, *, upload_id: str, parts: list[UploadedPart]) -> None:
        """Join the parts into the object `key` (the upload then ends)."""
        joined = [Part(part.number, part.etag) for part in parts]
        with _failures(f"cannot complete the upload to {key!r}"):
            self._client._complete_multipart_upload(self.bucket, key, upload_id, joined)

    def abort_multipart(self, key: str, *, upload_id: str) -> None:
        """Drop an upload and the parts it holds."""
        with _failures(f"cannot abort the upload to {key!r}"):
            self._client._abort_multipart_upload(self.bucket, key, upload_id)

    def pending_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Multipart uploads under `prefix` that were neither completed nor aborted."""
        found: list[PendingUpload] = []
        key_marker: str | None = None
        id_marker: str | None = None
        while True:
            with _failures(f"cannot list the uploads under {prefix!r}"):
                listed = self._client._list_multipart_uploads(
                    self.bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=id_marker
                )
            found.extend(
                PendingUpload(u.object_name, u.upload_id, u.initiated_time)
                for u in listed.uploads
                if u.object_name is not None and u.upload_id is not None
            )
            if not listed.is_truncated:
                return found
            key_marker, id_marker = listed.next_key_marker, listed.next_upload_id_marker
