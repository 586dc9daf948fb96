"""Fixtures for the deployment checks: the tools, skipped with the reason when absent, and a
scratch copy of the deployment files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import tools
from tests.deploy.scratch import copy_deployment_files


@pytest.fixture(scope="session")
def kustomize() -> list[str]:
    found = tools.find_kustomize()
    if found is None:
        pytest.skip(tools.NO_KUSTOMIZE)
    return found


@pytest.fixture(scope="session")
def compose() -> list[str]:
    found = tools.find_compose()
    if found is None:
        pytest.skip(tools.NO_COMPOSE)
    return found


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the deployment files, to break."""
    return copy_deployment_files(tmp_path / "repo")
