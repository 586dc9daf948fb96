"""Under pytest-xdist, tests of one xdist group must run on one worker (tests/conftest.py): the
simulator tests share one demo run, and the `timed` tests must not overlap. pytest-xdist keeps a
group together through a suffix it adds to each node id; a pytest that drops it (9.2,
pytest-dev/pytest-xdist#1386) spreads every group over the workers without a word."""

from __future__ import annotations

import os

import pytest


def test_this_module_runs_as_its_own_xdist_group(request: pytest.FixtureRequest) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ or not request.config.getvalue("loadgroup"):
        pytest.skip("runs under `pytest -n 2 --dist loadgroup` (`make test`)")
    assert request.node.nodeid.endswith("@tests/test_suite_groups.py")
