"""Fixtures: real servers for every backend, never fakes.

- Redis: `TESSERA_REDIS_URL` if set, else an embedded Valkey.
- S3: a SeaweedFS server on a free port, always.
- Database: `TESSERA_DATABASE_URL` if set (PostgreSQL gets a fresh database per run), else SQLite.

Under pytest-xdist (`make test` runs two workers) each worker is a session of its own: its own
embedded servers, or its own PostgreSQL database and block of Redis databases on configured
ones (tests.helpers.redis_database); torch threads are shared out between the workers, and each
test module runs whole on one worker (`--dist loadgroup`, a module being the default group).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from tessera import db, procs
from tessera.config import Settings
from tessera.devstack import EmbeddedSeaweed, EmbeddedValkey
from tessera.events import AGGREGATION_QUEUE, INFERENCE_QUEUE
from tessera.model.base import BaseModel, load_base_model
from tessera.models import Base
from tessera.stack import worker_command
from tessera.storage import ObjectStore
from tests.helpers import on_redis_database

S3_ACCESS_KEY = "tessera-test"
S3_SECRET_KEY = "tessera-test-secret-key"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores out between the workers: torch here, and the
    processes that tests start (services, Celery workers, the CLI) through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test with no xdist group of its own runs in its module's: a module's fixtures are set
    up once, on one worker."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("TESSERA_REDIS_URL")
    if configured:
        # pytest-xdist's workers share the configured server, each on its own databases.
        under_xdist = "PYTEST_XDIST_WORKER" in os.environ
        yield on_redis_database(configured, 0) if under_xdist else configured
        return
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"), persistent=False)
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedSeaweed(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        bucket="tessera-test",
    )
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str | None:
    """The configured PostgreSQL URL, if the run has one."""
    configured = os.environ.get("TESSERA_DATABASE_URL", "")
    return configured if configured.startswith("postgresql") else None


@pytest.fixture(scope="session")
def database_url(
    tmp_path_factory: pytest.TempPathFactory, postgres_admin_url: str | None
) -> Iterator[str]:
    """A migrated, empty database for this run: a fresh PostgreSQL database, or a SQLite file."""
    if postgres_admin_url:
        with fresh_postgres_database(postgres_admin_url) as url:
            db.upgrade(url)
            yield url
        return
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'tessera.db'}"
    db.upgrade(url)
    yield url


@pytest.fixture(scope="session")
def fresh_postgres(postgres_admin_url: str | None) -> Iterator[str | None]:
    """Another empty PostgreSQL database (for migration tests), or None without PostgreSQL."""
    if not postgres_admin_url:
        yield None
        return
    with fresh_postgres_database(postgres_admin_url) as url:
        yield url


class fresh_postgres_database:
    """CREATE a uniquely named database next to `admin_url`'s; DROP it on exit."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"tessera_test_{uuid.uuid4().hex[:12]}"

    def __enter__(self) -> str:
        self._admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.name}"'))
        return (
            make_url(self.admin_url).set(database=self.name).render_as_string(hide_password=False)
        )

    def __exit__(self, *_exc: object) -> None:
        with self._admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()


@pytest.fixture(scope="session")
def base_settings(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, s3_endpoint: str
) -> Settings:
    return Settings(
        env="test",
        data_dir=tmp_path_factory.mktemp("data"),
        database_url=database_url,
        redis_url=redis_url,
        s3_endpoint=s3_endpoint,
        s3_bucket="tessera-test",
        s3_access_key=S3_ACCESS_KEY,
        s3_secret_key=S3_SECRET_KEY,
        log_format="text",
    )


@pytest.fixture
def settings(base_settings: Settings) -> Iterator[Settings]:
    """Session settings over an emptied database (every table truncated before the test)."""
    engine = db.create_db_engine(base_settings.resolved_database_url)
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    engine.dispose()
    yield base_settings


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    engine = db.create_db_engine(settings.resolved_database_url)
    with Session(engine) as session:
        yield session
    engine.dispose()


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    return store


@pytest.fixture(scope="session")
def worker(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real Celery worker process on the session's Redis and database, consuming the
    aggregation queue and the inference queue, so that every service's /readyz finds a worker
    of its own queue. It runs aggregation tasks only, and drops a generation job's message as
    an unregistered task: the inference tests queue theirs on a Redis database of their own,
    and the console's browser test takes the inference queue from this worker while it runs."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {**os.environ, **base_settings.as_env()}
    process = procs.spawn(
        worker_command(
            queues=[AGGREGATION_QUEUE, INFERENCE_QUEUE],
            concurrency=1,
            name=f"test-{uuid.uuid4().hex[:8]}",
        ),
        log_path=log_path,
        env=env,
    )
    try:
        from tessera.queue import make_celery

        app = make_celery(base_settings)
        procs.wait_until(
            lambda: bool(app.control.ping(timeout=0.5)),
            timeout=180,  # a worker's start on a busy shared machine
            what="Celery worker",
            process=process,
            log_path=log_path,
        )
        app.close()
        yield
    finally:
        procs.stop(process)


@pytest.fixture(scope="session")
def base_model() -> BaseModel:
    """The bundled tiny base model, loaded once (tests must not change its weights)."""
    return load_base_model()


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A small random checkpoint folder of an architecture (sd1, sd2, sdxl), built once."""
    from tessera.model.synthetic import build_random_folder

    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            path = tmp_path_factory.mktemp(f"model-{family}")
            built[family] = build_random_folder(path, family)  # type: ignore[arg-type]
        return built[family]

    return folder
