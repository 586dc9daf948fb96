import pytest

# Every test here exercises a real backend server; CI runs them again on the embedded ones.
pytestmark = pytest.mark.backend


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/backends/" in str(item.fspath):
            item.add_marker(pytest.mark.backend)
