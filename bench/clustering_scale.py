"""Re-clustering 100,000 devices off the request path, and assigning a new device, on this machine.

    python bench/clustering_scale.py --out docs [--devices 100000] [--dim 384]

Synthetic task vectors: `--true-k` unit directions in `--dim` dimensions that share a common
component (cosine about 0.36 between directions), each device's vector one of them plus
Gaussian noise (cosine about 0.86 to its direction), as MiniLM's pooled vectors look. Each
measurement runs in a process of its own, so that its peak resident set (Linux VmHWM) is its own:

- *algorithm*: `cluster_vectors` (k-means, k chosen by silhouette among 2..8, the defaults of
  `POST /v1/clusterings`) on the vectors, under the default settings: above
  TESSERA_CLUSTERING_LARGE_N (5,000) that is MiniBatchKMeans with the silhouette of 4,000
  sampled devices. The peak is reset once the vectors are built, so it includes them. For
  comparison, the exact path that serves small populations (KMeans, silhouette on the full
  n x n cosine distances) at `--exact-n` devices.
- *task*: the same devices enrolled in a migrated SQLite database (one task vector each), a
  queued job, and the Celery task `tessera.clustering.recluster` run in this process
  (`Task.apply`: the worker's code, without the broker) with the worker's settings: it reads
  every device's vectors, clusters them, writes the clustering and one assignment per device,
  and marks the job succeeded in the same commit. Peak from the process's start (torch and
  the worker's imports included), with the resident set just before the task.
- *assignment*: `POST /v1/assignments` on the clustering app (in-process ASGI client, the whole
  FastAPI stack and its database session) for `--assignments` new devices, each with its own
  task vector, after the task's clustering: p50 / p95 latency, at `--devices` and at a
  population of `--small-n`, to show that it does not grow with n (O(k)).

Writes docs/bench_clustering.md, .json and .png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import common_arguments, machine, reset_peak, status_bytes, summary, write_report

NAME = "bench_clustering"
SHARED = 0.6  # the common component of the true directions
NOISE = 0.03  # per-dimension noise around each direction
BATCH = 10_000  # rows per INSERT when enrolling devices


# -- synthetic devices -------------------------------------------------------------------------


def true_directions(k: int, dim: int, *, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    common /= np.linalg.norm(common)
    own = rng.normal(size=(k, dim))
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    rows = SHARED * common + np.sqrt(1 - SHARED**2) * own
    return np.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True))


def task_vectors(
    n: int, dim: int, *, true_k: int, seed: int, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors (float32, as stored) around the true directions, and each one's truth."""
    centres = true_directions(true_k, dim, seed=seed)
    rng = np.random.default_rng(seed + 1 + offset)
    truth = rng.integers(0, true_k, size=n)
    rows = centres[truth] + rng.normal(scale=NOISE, size=(n, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(np.float32), truth


def enrol(url: str, vectors: np.ndarray, *, prefix: str) -> list[int]:
    """Devices with one task vector each, inserted in batches; their client ids."""
    from sqlalchemy import insert, select

    from tessera import db
    from tessera.models import Client, Role, TaskEmbedding

    engine = db.create_db_engine(url)
    ids: list[int] = []
    with db.session_factory(engine)() as session:
        for start in range(0, len(vectors), BATCH):
            names = [f"{prefix}-{i}" for i in range(start, min(start + BATCH, len(vectors)))]
            session.execute(
                insert(Client),
                [
                    {
                        "name": name,
                        "role": Role.DEVICE,
                        "token_hash": hashlib.sha256(name.encode()).hexdigest(),
                    }
                    for name in names
                ],
            )
            found = session.execute(select(Client.name, Client.id).where(Client.name.in_(names)))
            by_name = {row[0]: int(row[1]) for row in found}
            rows = [by_name[name] for name in names]
            session.execute(
                insert(TaskEmbedding),
                [
                    {
                        "client_id": client_id,
                        "vector": vectors[start + i].tobytes(),
                        "dim": vectors.shape[1],
                        "encoder_id": "bench",
                    }
                    for i, client_id in enumerate(rows)
                ],
            )
            session.commit()
            ids += rows
    engine.dispose()
    return ids


# -- one measurement in this process -------------------------------------------------------------


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    kind = job["kind"]
    if kind == "algorithm":
        return _algorithm(job)
    if kind == "task":
        return _task(job)
    return _assignments(job)


def _algorithm(job: dict[str, Any]) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score

    from services.clustering.algorithms import cluster_vectors

    vectors, truth = task_vectors(job["n"], job["dim"], true_k=job["true_k"], seed=job["seed"])
    x = vectors.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    del vectors
    inputs = x.nbytes
    reset_peak()
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    result = cluster_vectors(x, method="kmeans", seed=job["seed"], large_n=job["large_n"])
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_bytes": status_bytes("VmHWM"),
        "inputs_bytes": inputs,
        "before_bytes": before,
        "k": result.k,
        "silhouette": result.silhouette,
        "ari": float(adjusted_rand_score(truth, result.labels)),
    }


def _task(job: dict[str, Any]) -> dict[str, Any]:
    from sqlalchemy import select

    from services.worker.tasks.clustering import recluster
    from tessera import db
    from tessera.models import Clustering, ClusteringJob, JobState

    engine = db.create_db_engine(job["url"])
    with db.session_factory(engine)() as session:
        queued = ClusteringJob(state=JobState.QUEUED, trigger="operator", params={"seed": 0})
        session.add(queued)
        session.commit()
        job_id = queued.id
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    outcome = recluster.apply(args=[job_id]).get()
    seconds = time.perf_counter() - start
    with db.session_factory(engine)() as session:
        newest = select(Clustering).order_by(Clustering.version.desc())
        clustering = session.scalars(newest).first()
        assert clustering is not None, outcome
        metrics = dict(clustering.metrics)
    engine.dispose()
    return {
        "seconds": seconds,
        "peak_bytes": status_bytes("VmHWM"),
        "before_bytes": before,
        "state": outcome["state"],
        "k": metrics["k"],
        "silhouette": metrics["silhouette"],
        "n_devices": metrics["n_devices"],
    }


def _assignments(job: dict[str, Any]) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from services.clustering.main import create_app
    from tessera.config import get_settings

    settings = get_settings()
    vectors, _ = task_vectors(
        job["count"], job["dim"], true_k=job["true_k"], seed=job["seed"], offset=10**6
    )
    new = enrol(job["url"], vectors, prefix=f"new-{job['n']}")
    headers = {"Authorization": f"Bearer {settings.operator_token.get_secret_value()}"}
    samples = []
    with TestClient(create_app(settings)) as api:
        for client_id in [new[0], *new]:  # the first call warms up the app and the pool
            start = time.perf_counter()
            answer = api.post("/v1/assignments", json={"client_id": client_id}, headers=headers)
            samples.append(time.perf_counter() - start)
            answer.raise_for_status()
    return {**summary(samples[1:]), "samples": len(samples) - 1, "n": job["n"]}


def child(job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON result."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{job['kind']} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({**job, **result}), flush=True)
    return result


# -- the run -------------------------------------------------------------------------------------


def database(scratch: Path, n: int, args: argparse.Namespace) -> str:
    """A migrated SQLite database with n enrolled devices; its URL."""
    from tessera import db

    url = f"sqlite:///{scratch / f'bench-{n}.db'}"
    db.upgrade(url)
    vectors, _ = task_vectors(n, args.dim, true_k=args.true_k, seed=args.seed)
    started = time.perf_counter()
    enrol(url, vectors, prefix="edge")
    print(f"enrolled {n} devices in {time.perf_counter() - started:.1f} s", flush=True)
    return url


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TESSERA_LOG_LEVEL": "WARNING"}
    env = {k: v for k, v in env.items() if k not in ("TESSERA_DATABASE_URL", "TESSERA_REDIS_URL")}
    common = {"dim": args.dim, "true_k": args.true_k, "seed": args.seed}
    report: dict[str, Any] = {"devices": args.devices, **common, "algorithm": [], "task": []}
    for n, large_n in ((args.exact_n, args.exact_n), (args.devices, args.large_n)):
        path = "exact (KMeans, full silhouette)" if n <= large_n else "MiniBatchKMeans"
        row = child({"kind": "algorithm", "n": n, "large_n": large_n, **common}, env)
        report["algorithm"].append({"n": n, "path": path, **row})
    assignments = []
    with tempfile.TemporaryDirectory() as scratch:
        for n in (args.small_n, args.devices):
            url = database(Path(scratch), n, args)
            task_env = {**env, "TESSERA_DATABASE_URL": url}
            row = child({"kind": "task", "url": url, "n": n, **common}, task_env)
            report["task"].append({"n": n, **row})
            job = {"kind": "assign", "url": url, "n": n, "count": args.assignments, **common}
            assignments.append(child(job, task_env))
    report["assignment"] = assignments
    report["machine"] = machine(args.threads)
    return report


# -- reporting -----------------------------------------------------------------------------------


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Re-clustering at scale (`make bench`: bench/clustering_scale.py)",
        "",
        f"Measured on this machine: {report['machine']}. {report['devices']:,} synthetic "
        f"{report['dim']}-d task vectors around {report['true_k']} true directions (see the "
        "script's docstring); k-means with k chosen by silhouette among 2..8, default settings. "
        "Each row ran in its own process; peak is that process's peak resident set.",
        "",
        "## The algorithm alone (`cluster_vectors`)",
        "",
        "| devices | path | seconds | peak | resident before (vectors included) | vectors "
        "| k found | silhouette | ARI against the truth |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["algorithm"]:
        silhouette = "-" if row["silhouette"] is None else f"{row['silhouette']:.3f}"
        lines.append(
            f"| {row['n']:,} | {row['path']} | {row['seconds']:.1f} | {_gb(row['peak_bytes'])} "
            f"| {_gb(row['before_bytes'])} | {_gb(row['inputs_bytes'])} | {row['k']} "
            f"| {silhouette} | {row['ari']:.3f} |"
        )
    lines += [
        "",
        "The exact path's n x n distance matrix alone would be "
        f"{_gb(8 * report['devices'] ** 2)} at {report['devices']:,} devices; it is not run "
        "there.",
        "",
        "## Through the task (`tessera.clustering.recluster`: database in, clustering and "
        "assignments out)",
        "",
        "| devices | seconds | peak | resident before the task | k found | silhouette |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["task"]:
        silhouette = "-" if row["silhouette"] is None else f"{row['silhouette']:.3f}"
        lines.append(
            f"| {row['n']:,} | {row['seconds']:.1f} | {_gb(row['peak_bytes'])} "
            f"| {_gb(row['before_bytes'])} | {row['k']} | {silhouette} |"
        )
    lines += [
        "",
        "## Assigning a new device (`POST /v1/assignments`, synchronous, O(k))",
        "",
        "| devices clustered | assignments | p50 | p95 |",
        "|---|---|---|---|",
    ]
    for row in report["assignment"]:
        lines.append(
            f"| {row['n']:,} | {row['samples']} | {row['median_s'] * 1e3:.1f} ms "
            f"| {row['p95_s'] * 1e3:.1f} ms |"
        )
    large, task = report["algorithm"][-1], report["task"][-1]
    small, big = report["assignment"][0], report["assignment"][-1]
    lines += [
        "",
        "## Reading",
        "",
        f"- At {large['n']:,} devices the algorithm took {large['seconds']:.0f} s and "
        f"{_gb(large['peak_bytes'] - large['before_bytes'])} over the resident vectors; the "
        f"task, reading every device's vectors from SQLite and writing {task['n']:,} "
        f"assignments in the job's commit, {task['seconds']:.0f} s and "
        f"{_gb(task['peak_bytes'] - task['before_bytes'])} over the worker's resident set "
        "(the directions as one [n, d] float64 matrix, filled as the rows stream in 5,000 at "
        "a time, and k-means' working memory). Neither forms anything n x n.",
        f"- Assigning a new device took {small['median_s'] * 1e3:.0f} / "
        f"{big['median_s'] * 1e3:.0f} ms (p50) with {small['n']:,} / {big['n']:,} devices "
        "clustered: it reads the device's own vectors and the k centroids only.",
        "- One run on a shared machine: timings move with the load average, so compare rows "
        "of one run only.",
        "",
        f"![time and memory]({NAME}.png)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    bars = [
        (f"algorithm\n{r['n']:,}\n{r['path'].split(' ')[0]}", r) for r in report["algorithm"]
    ] + [(f"task\n{r['n']:,}", r) for r in report["task"]]
    labels = [label for label, _ in bars]
    left.bar(labels, [r["seconds"] for _, r in bars], color="C0")
    left.set(ylabel="seconds", title="re-clustering")
    twin = left.twinx()
    twin.plot(labels, [r["peak_bytes"] / 1e9 for _, r in bars], "o", color="C3")
    twin.set(ylabel="peak GB (red)")
    left.tick_params(axis="x", labelsize=7)
    sizes = [f"{r['n']:,}" for r in report["assignment"]]
    p50 = [r["median_s"] * 1e3 for r in report["assignment"]]
    p95 = [r["p95_s"] * 1e3 for r in report["assignment"]]
    positions = np.arange(len(sizes))
    right.bar(positions - 0.2, p50, width=0.4, label="p50")
    right.bar(positions + 0.2, p95, width=0.4, label="p95")
    right.set_xticks(positions, sizes)
    right.set(xlabel="devices clustered", ylabel="ms", title="assigning a new device")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--true-k", type=int, default=6)
    parser.add_argument("--exact-n", type=int, default=5000)
    parser.add_argument("--small-n", type=int, default=1000)
    parser.add_argument("--large-n", type=int, default=5000, help="TESSERA_CLUSTERING_LARGE_N")
    parser.add_argument("--assignments", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    common_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    path = args.out / f"{NAME}.json"
    report = json.loads(path.read_text()) if args.report_only else run(args)
    write_report(report, args.out, NAME, markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
