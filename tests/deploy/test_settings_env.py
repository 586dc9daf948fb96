"""The variables that compose, Kubernetes and .env.example set are exactly the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from tessera.config import Settings
from tests.deploy import settings_env
from tests.deploy.scratch import replace_in
from tests.deploy.tools import REPO


def test_deployment_files_name_only_settings() -> None:
    assert settings_env.unknown_setting_mentions(REPO) == []


def test_env_example_lists_every_setting_under_a_comment() -> None:
    assert settings_env.env_example_problems(REPO) == []


def test_compose_passes_every_setting_and_nothing_else() -> None:
    assert settings_env.compose_environment_problems(REPO) == []


def test_the_settings_come_from_the_code() -> None:
    expected = {f"TESSERA_{name.upper()}" for name in Settings.model_fields}

    assert settings_env.setting_variables() == expected
    assert {"TESSERA_OPERATOR_TOKEN", "TESSERA_DATABASE_URL"} <= (
        settings_env.secret_setting_variables()
    )


def test_a_misspelt_variable_is_caught_wherever_it_is(tree: Path) -> None:
    replace_in(tree / "docker-compose.yml", "  TESSERA_LOG_LEVEL:\n", "  TESSERA_LOG_LEVLE:\n")
    replace_in(
        tree / "k8s" / "overlays" / "dev" / "kustomization.yaml",
        "- TESSERA_ENV=development",
        "- TESERA_ENV=development",
    )

    mentions = settings_env.unknown_setting_mentions(tree)
    compose = settings_env.compose_environment_problems(tree)

    assert any("docker-compose.yml:" in p and "TESSERA_LOG_LEVLE" in p for p in mentions)
    assert any("sets TESSERA_LOG_LEVLE, not a setting" in p for p in compose)
    assert any("does not pass TESSERA_LOG_LEVEL" in p for p in compose)
    # Not TESSERA_-prefixed, so only the rendered check sees it (test_manifests).
    assert not any("TESERA_ENV" in p for p in mentions)


def test_a_new_setting_must_be_listed(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class LaterSettings(Settings):
        image_cache_bytes: int = Field(default=1 << 30, description="Image cache size.")

    monkeypatch.setattr(settings_env, "Settings", LaterSettings)

    listed = settings_env.env_example_problems(tree)
    passed = settings_env.compose_environment_problems(tree)

    assert any("TESSERA_IMAGE_CACHE_BYTES is not listed" in p for p in listed)
    assert any("does not pass TESSERA_IMAGE_CACHE_BYTES" in p for p in passed)


def test_env_example_without_a_setting_or_with_a_stranger_fails(tree: Path) -> None:
    replace_in(tree / ".env.example", "# TESSERA_LOG_FORMAT=json\n", "")
    replace_in(tree / ".env.example", "POSTGRES_PASSWORD=", "POSTGRES_PASWORD=")

    problems = settings_env.env_example_problems(tree)

    assert any("TESSERA_LOG_FORMAT is not listed" in p for p in problems)
    assert any("POSTGRES_PASWORD is neither a setting" in p for p in problems)
    compose = settings_env.compose_environment_problems(tree)
    assert any(
        "${POSTGRES_PASSWORD} is used but .env.example does not list it" in p for p in compose
    )
