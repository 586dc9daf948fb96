"""Settings: defaults for development, refusals in production, the environment round trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tessera.config import Environment, Settings

STRONG = "x" * 32
PRODUCTION_OK = {
    "env": "production",
    "database_url": "postgresql+psycopg://u:p@db/tessera",
    "redis_url": "redis://redis:6379/0",
    "s3_endpoint": "minio:9000",
    "operator_token": STRONG,
    "token_secret": STRONG + "y",
    "s3_secret_key": STRONG + "z",
}


def test_development_defaults_need_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TESSERA_DATABASE_URL", "TESSERA_REDIS_URL", "TESSERA_S3_ENDPOINT", "TESSERA_ENV"):
        monkeypatch.delenv(name, raising=False)

    settings = Settings()

    assert settings.env is Environment.DEVELOPMENT
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.redis_url is None


def test_production_accepts_explicit_secrets_and_urls() -> None:
    settings = Settings(**PRODUCTION_OK)

    assert settings.env is Environment.PRODUCTION


@pytest.mark.parametrize(
    ("field", "variable"),
    [
        ("operator_token", "TESSERA_OPERATOR_TOKEN"),
        ("token_secret", "TESSERA_TOKEN_SECRET"),
        ("s3_secret_key", "TESSERA_S3_SECRET_KEY"),
    ],
)
def test_production_refuses_default_secrets_naming_the_variable(field: str, variable: str) -> None:
    values = {k: v for k, v in PRODUCTION_OK.items() if k != field}

    with pytest.raises(ValidationError) as raised:
        Settings(**values)

    assert variable in str(raised.value)
    assert "development default" in str(raised.value)


@pytest.mark.parametrize(
    ("field", "variable"),
    [
        ("database_url", "TESSERA_DATABASE_URL"),
        ("redis_url", "TESSERA_REDIS_URL"),
        ("s3_endpoint", "TESSERA_S3_ENDPOINT"),
    ],
)
def test_production_refuses_missing_urls_naming_the_variable(
    field: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(variable, raising=False)
    values = {k: v for k, v in PRODUCTION_OK.items() if k != field}

    with pytest.raises(ValidationError) as raised:
        Settings(**values)

    assert f"{variable} must be set in production" in str(raised.value)


def test_production_refuses_short_secrets() -> None:
    with pytest.raises(ValidationError, match="TESSERA_OPERATOR_TOKEN is shorter than 16"):
        Settings(**{**PRODUCTION_OK, "operator_token": "short"})


def test_settings_are_read_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("TESSERA_S3_BUCKET", "adapters")

    settings = Settings()

    assert settings.max_upload_bytes == 1234
    assert settings.s3_bucket == "adapters"


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_limits_must_be_positive_integers(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TESSERA_MAX_UPLOAD_BYTES", value)

    with pytest.raises(ValidationError, match="max_upload_bytes"):
        Settings()


def test_as_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(**PRODUCTION_OK)
    for name, value in original.as_env().items():
        monkeypatch.setenv(name, value)

    assert Settings() == original
