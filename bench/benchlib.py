"""What the benchmark scripts share: timing summaries, the machine line, embedded backends."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tessera import db
from tessera.devstack import DevStack, embedded_settings
from tessera.storage import ObjectStore


def per_call(fn: Callable[[Any], object], items: Sequence[Any]) -> list[float]:
    """Wall seconds of `fn(item)` for each item."""
    samples = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        samples.append(time.perf_counter() - start)
    return samples


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median and 95th percentile (nearest rank) of wall-time samples."""
    ordered = sorted(samples)
    return {
        "median_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "n": len(ordered),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def write_report(
    report: dict[str, Any],
    out: Path,
    name: str,
    *,
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> None:
    """`name`.json, .png and .md in `out`; the table is printed too."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"{name}.png")
    (out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark takes."""
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the table and plot from the JSON"
    )


def machine(threads: int) -> str:
    """What the numbers were measured on, with the load average at the end of the run."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} torch threads, "
        f"load average at the end {load}"
    )


@contextlib.contextmanager
def embedded_backends(data_dir: Path) -> Iterator[tuple[sessionmaker[Session], ObjectStore]]:
    """A fresh, migrated SQLite database and a SeaweedFS server with its bucket, in `data_dir`."""
    settings = embedded_settings(data_dir)
    devstack = DevStack(settings)
    try:
        backends = devstack.start()
        url = backends["TESSERA_DATABASE_URL"]
        db.upgrade(url)
        store = ObjectStore.from_settings(
            settings.model_copy(update={"s3_endpoint": backends["TESSERA_S3_ENDPOINT"]})
        )
        store.ensure_bucket()
        yield db.session_factory(db.create_db_engine(url)), store
    finally:
        devstack.stop()


def resident_bytes() -> int:
    """This process's resident set size now (Linux `/proc/self/statm`), in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start this process's peak resident set (VmHWM) again from its current size (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def status_bytes(field: str) -> int:
    """A size field of `/proc/self/status` (VmHWM: the peak resident set, VmRSS: now), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
