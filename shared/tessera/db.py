"""Database engine, sessions and migrations (Alembic), for PostgreSQL and SQLite alike.

A process that answers requests gives PostgreSQL CONNECT_TIMEOUT_S to connect, and
QUICK_DATABASE_TIMEOUT_S to run a statement (server side) and to answer (client side: a server
whose process is stopped accepts connections and never answers, and no server-side timeout
fires then); the connection is then closed and the request is a 503. Before, a frozen database
held a request, and every request after it once the pool was taken, as long as it stayed frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from psycopg.abc import RV, PQGen
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
QUICK_DATABASE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2  # with a timeout: libpq's shortest, as the other backends' connect timeout


POOL_SIZE = 5  # connections kept open; more are opened up to the engine's `connections`
POOL_TIMEOUT_S = 10.0
"""How long a request waits for a pooled connection before its 503 (sqlalchemy's TimeoutError).
With authentication on a brief session and work in flight bounded below the pool, it waits
only when something else holds connections (a housekeeping pass, a console page)."""


def create_db_engine(url: str, *, connections: int = 15, timeout_s: float | None = None) -> Engine:
    """An engine for `url` holding at most `connections` connections; SQLite gets foreign keys,
    a busy timeout and WAL for concurrent use.

    `timeout_s` (PostgreSQL): the longest a statement or an answer is waited for, and
    CONNECT_TIMEOUT_S a connection; past it, an OperationalError. None: no deadline (workers,
    migrations).
    """
    parsed = make_url(url)
    pool: dict[str, Any] = {
        "pool_size": min(POOL_SIZE, connections),
        "max_overflow": max(0, connections - POOL_SIZE),
        "pool_timeout": POOL_TIMEOUT_S,
    }
    if parsed.get_backend_name() != "sqlite":
        if timeout_s is None:
            return create_engine(url, pool_pre_ping=True, **pool)
        return _postgres_with_deadlines(url, timeout_s, pool)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    else:
        pool = {}  # an in-memory database is one connection's (SingletonThreadPool)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **pool)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


def _postgres_with_deadlines(url: str, timeout_s: float, pool: dict[str, Any]) -> Engine:
    engine = create_engine(
        url,
        pool_pre_ping=True,
        **pool,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={int(timeout_s * 1000)}",
        },
    )

    class Answering(_AnswerDeadline):
        answer_timeout_s = timeout_s

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return Answering.connect(*cargs, **cparams)

    return engine


class _AnswerDeadline(psycopg.Connection[Any]):
    """A psycopg connection that waits at most `answer_timeout_s` for the server to answer,
    then closes itself (its state is unknown), which SQLAlchemy reads as a disconnect."""

    answer_timeout_s: float | None = None

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        try:
            return super().wait(
                gen, interval, self.answer_timeout_s if timeout is None else timeout
            )
        except psycopg.OperationalError:
            if self.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                self.close()  # a statement sent, no answer: the server is frozen or gone
            raise


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping(engine: Engine) -> None:
    """Raise unless the database answers a trivial query."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at `url` down to `revision`."""
    command.downgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
