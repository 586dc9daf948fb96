"""Migrations go up and down on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from tessera import db
from tessera.models import Base

EXPECTED_TABLES = {
    "clients",
    "task_embeddings",
    "rounds",
    "updates",
    "clusterings",
    "clusters",
    "assignments",
    "adapters",
    "adapter_versions",
    "generation_jobs",
}


def _database_urls(tmp_path: Path, fresh_postgres: str | None) -> list[str]:
    urls = [f"sqlite:///{tmp_path / 'migrate.db'}"]
    if fresh_postgres:
        urls.append(fresh_postgres)
    return urls


@pytest.fixture
def urls(tmp_path: Path, fresh_postgres: str | None) -> list[str]:
    return _database_urls(tmp_path, fresh_postgres)


def test_upgrade_creates_every_table_and_downgrade_removes_them(urls: list[str]) -> None:
    for url in urls:
        engine = db.create_db_engine(url)

        db.upgrade(url)
        after_upgrade = set(inspect(engine).get_table_names())
        revision = db.current_revision(engine)
        db.downgrade(url, "base")
        after_downgrade = set(inspect(engine).get_table_names())
        db.upgrade(url)
        after_second_upgrade = set(inspect(engine).get_table_names())
        engine.dispose()

        assert after_upgrade >= EXPECTED_TABLES, url
        assert revision is not None
        assert after_downgrade <= {"alembic_version"}, url
        assert after_second_upgrade >= EXPECTED_TABLES, url


def test_migrations_match_the_models(urls: list[str]) -> None:
    for url in urls:
        db.upgrade(url)
        engine = db.create_db_engine(url)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            differences = compare_metadata(context, Base.metadata)
        engine.dispose()

        assert differences == [], f"models and migrations differ on {url}: {differences}"


def test_configured_database_is_postgres_when_ci_says_so(
    postgres_admin_url: str | None, database_url: str
) -> None:
    if postgres_admin_url is None:
        assert database_url.startswith("sqlite")
    else:
        assert database_url.startswith("postgresql")
