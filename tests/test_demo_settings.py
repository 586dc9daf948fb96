"""The demo's stack uses embedded servers only, whatever URLs the environment holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.sim.stack import demo_settings


def test_demo_ignores_configured_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/test")
    monkeypatch.setenv("TESSERA_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("TESSERA_S3_ENDPOINT", "127.0.0.1:9000")

    settings = demo_settings(tmp_path)

    assert settings.database_url is settings.redis_url is settings.s3_endpoint is None
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert "TESSERA_DATABASE_URL" not in settings.as_env()
