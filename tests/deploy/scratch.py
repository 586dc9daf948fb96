"""A scratch copy of the deployment files, for tests that break one on purpose."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.deploy.tools import REPO

# Everything the deployment checks read.
DEPLOYMENT_FILES = (
    "k8s",
    "docker-compose.yml",
    "docker-compose.gpu.yml",
    ".env.example",
    ".yamllint",
    ".gitignore",
    "Dockerfile",
    "docs/deploy.md",
)


def copy_deployment_files(root: Path) -> Path:
    for name in DEPLOYMENT_FILES:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.is_file():
            shutil.copy2(source, target)
    return root


def replace_in(path: Path, old: str, new: str) -> None:
    """Change the first `old` in a file; fail loudly if it is not there."""
    text = path.read_text()
    assert old in text, f"{old!r} not found in {path}"
    path.write_text(text.replace(old, new, 1))
