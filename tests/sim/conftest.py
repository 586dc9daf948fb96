"""One run of the demo's federation, shared by the slow simulator tests of this package.

`run_demo` runs cluster-aware, global FedAvg and local only on fresh stacks with the same
devices, seeds and budget; the method's claim, the demo's report and the simulator's HTTP run
are all checked on that one run instead of three runs of overlapping populations.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tessera.demo import DEMO_CONFIG, run_demo
from tessera.sim import SimReport
from tessera.stack import StackInfo

# The demo's federation with twice the evaluation images (36 a round), so that the method's
# margin is measured on enough generations (tests/sim/test_method.py).
METHOD = replace(DEMO_CONFIG, eval_images=6, seed=0)


@dataclass
class DemoRun:
    """What one `run_demo` returned, wrote and printed, and what its cluster-aware stack served."""

    result: dict[str, Any]
    output: Path
    printed: str
    exact: SimReport  # the cluster-aware run's report, as the simulator returned it
    scraped: dict[str, str]  # each worker's /metrics, read while the cluster-aware stack ran


class _Tee(io.StringIO):
    """Keeps what is written, and passes it on to `stream` (so pytest shows it on a failure)."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    folder = tmp_path_factory.mktemp("demo") / "demo"
    seen: dict[str, Any] = {}

    def scrape_worker_metrics(info: StackInfo, report: SimReport) -> None:
        seen["exact"] = report
        seen["scraped"] = {name: httpx.get(url).text for name, url in info.metrics.items()}

    printed = _Tee(sys.stdout)
    with contextlib.redirect_stdout(printed):
        result = run_demo(str(folder), config=METHOD, after=scrape_worker_metrics)
    return DemoRun(result, folder / "output", printed.getvalue(), seen["exact"], seen["scraped"])
