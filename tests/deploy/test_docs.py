"""The operator guide documents every metric Tessera defines, and no metric that does not exist."""

from __future__ import annotations

import re
from types import ModuleType

from prometheus_client.metrics import MetricWrapperBase

import tessera.metrics
import tessera.service.middleware
from tests.deploy.tools import REPO

GUIDE = REPO / "docs" / "deploy.md"
METRIC_MODULES = (tessera.metrics, tessera.service.middleware)


def defined_metric_names(*modules: ModuleType) -> set[str]:
    """Names as Prometheus exports them (a counter with its `_total`)."""
    names = set()
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                for family in value.describe():
                    suffix = "_total" if family.type == "counter" else ""
                    names.add(family.name + suffix)
    return names


def test_the_guide_documents_exactly_the_metrics() -> None:
    documented = set(re.findall(r"^\| `(tessera_[a-z_]+)`", GUIDE.read_text(), re.MULTILINE))

    assert documented == defined_metric_names(*METRIC_MODULES)


def test_every_rejection_reason_is_documented() -> None:
    guide = GUIDE.read_text()

    for reason in tessera.metrics.RejectionReason:
        assert f"`{reason.value}`" in guide
