"""The worker process's connections, opened on first use and reset after fork."""

from __future__ import annotations

from tessera.config import get_settings
from tessera.service.resources import Resources

_resources: Resources | None = None


def resources() -> Resources:
    global _resources
    if _resources is None:
        _resources = Resources(get_settings())
    return _resources


def reset_after_fork() -> None:
    """Drop inherited connections without closing them (they belong to the parent)."""
    global _resources
    if _resources is not None and _resources.opened("engine"):
        _resources.engine.dispose(close=False)
    _resources = None


def close() -> None:
    global _resources
    if _resources is not None:
        _resources.close()
        _resources = None
