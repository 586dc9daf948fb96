"""The README documents every setting the code reads, and no setting that does not exist."""

from __future__ import annotations

import re

from tessera.config import Settings
from tests.helpers import REPO_ROOT


def test_readme_lists_exactly_the_settings() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("## Settings", 1)[1]

    documented = set(re.findall(r"^\| `(TESSERA_[A-Z0-9_]+)`", table, flags=re.MULTILINE))
    expected = {f"TESSERA_{name.upper()}" for name in Settings.model_fields}

    assert documented == expected
