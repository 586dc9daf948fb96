"""The simulator: N virtual devices over K styles drive the real services over HTTP for R rounds.

Methods:
- `exact`: cluster-aware, products averaged and re-factorised (Tessera's default);
- `fedavg`: cluster-aware, but A and B averaged separately (the generic-FL maths);
- `global`: one adapter for everybody by plain FedAvg (what generic FL frameworks give);
- `local`: no federation: each device keeps training its own adapter;
- `secure`: cluster-aware secure aggregation (docs/secure_aggregation.md): each device trains B
  only on its cluster's frozen A for the round and the server learns only each cluster's sum.
  Devices train and are scored in the pool like every other method; each device's protocol
  (`tessera.sdk.secure.SecureRound`) then runs in the device's own thread of this process, as
  its upload does, since a cluster's devices wait on each other between phases (in the pool's
  few processes a device waiting for a peer queued behind it would never see it answer).

Each device owns a few images (`samples`, the same every round) drawn from its style with its
personal variation, and spends the same budget in every method: `steps` at `batch_size` per
round, from the adapter it was served.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import numpy as np

from tessera.data import DEVICE_STYLES, make_device

if TYPE_CHECKING:
    from tessera.sim.devices import DeviceJob, DeviceRoundResult

Method = Literal["exact", "fedavg", "global", "local", "secure"]
METHODS: tuple[str, ...] = ("exact", "fedavg", "global", "local", "secure")
ROUND_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SimConfig:
    """The federation to simulate and how hard each device trains."""

    devices: int = 12
    styles: int = 3
    rounds: int = 3
    method: Method = "exact"
    steps: int = 30
    batch_size: int = 8
    lr: float = 5e-3
    rank: int = 8
    samples: int = 32  # the device's own images, the same in every round
    eval_images: int = 8
    eval_steps: int = 20
    hybrid_images: int = 0  # per round, images of the equal hybrid of two styles' adapters
    lam: float = 0.2
    temperature: float = 0.1
    workers: int = 2
    seed: int = 0
    style_names: tuple[str, ...] = ()
    model: str = ""  # base model folder for the stack and the devices; empty: the setting

    def chosen_styles(self) -> tuple[str, ...]:
        """The styles in play: given, else `styles` spread over the device styles."""
        if self.style_names:
            return self.style_names
        if not 1 <= self.styles <= len(DEVICE_STYLES):
            raise ValueError(f"styles must be in 1..{len(DEVICE_STYLES)}, found {self.styles}")
        picks = np.linspace(0, len(DEVICE_STYLES) - 1, self.styles).round().astype(int)
        return tuple(DEVICE_STYLES[i] for i in picks)


@dataclass(frozen=True)
class Stragglers:
    """Slow devices: the first `devices` enrolled train `factor` times as slowly (a simulated
    compute time; they wait the difference before uploading)."""

    devices: int = 0
    factor: float = 1.0

    def factor_of(self, position: int) -> float:
        """The compute factor of the device enrolled at `position` (0-based)."""
        return self.factor if position < self.devices else 1.0


@dataclass(frozen=True)
class Buffering:
    """Buffered asynchronous mode instead of sync rounds: one round in which each cluster
    publishes a version every `k` updates until `versions` are out (0: as many as hold the
    sync rounds' updates, rounds x devices / k); each device trains again from its cluster's
    newest version as soon as it has sent an update."""

    k: int
    versions: int = 0

    def versions_for(self, config: SimConfig) -> int:
        """The versions after which the buffered round is published."""
        return self.versions or max(1, config.rounds * config.devices // self.k)


@dataclass(frozen=True)
class Device:
    """An enrolled virtual device and its true style."""

    client_id: int
    name: str
    token: str
    style: str
    index: int


@dataclass
class RoundReport:
    """Per-round figures, averaged over the devices."""

    round: int
    heldout_loss: float
    style_accuracy: float
    content_accuracy: float
    train_loss: float
    bytes_up_per_device: float
    bytes_down_per_device: float
    seconds: float
    published: list[str] = field(default_factory=list)
    hybrid: dict[str, Any] | None = None  # HybridScores of the blend, when measured
    train_seconds_per_device: float | None = None  # None in runs saved before it was recorded


@dataclass
class SimReport:
    """Everything one simulation measured."""

    config: dict[str, Any]
    devices: list[dict[str, Any]]
    clusters: list[dict[str, Any]]
    ari: float | None  # None where nothing was clustered (local only)
    rounds: list[RoundReport]
    seconds: float

    def rounds_to(self, style_accuracy: float) -> int | None:
        """The first round whose style accuracy reaches the target, None if none does."""
        return next((r.round for r in self.rounds if r.style_accuracy >= style_accuracy), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


class Operator:
    """The operator's side of the simulation: enrol, cluster, open rounds, wait."""

    def __init__(self, *, aggregator_url: str, clustering_url: str, token: str):
        self.aggregator = httpx.Client(base_url=aggregator_url, timeout=60)
        self.clustering = httpx.Client(
            base_url=clustering_url, timeout=120, headers={"Authorization": f"Bearer {token}"}
        )
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"}

    def _ok(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise RuntimeError(
                f"{response.request.method} {response.request.url}: "
                f"{response.status_code} {response.text[:500]}"
            )
        return response.json()

    def recluster(self, seed: int) -> dict[str, Any]:
        """Cluster every enabled device (k-means, k chosen by silhouette) and wait for it."""
        from tessera.sdk.operator import recluster_and_wait

        options = {"method": "kmeans", "seed": seed}
        return recluster_and_wait(self.clustering, options, timeout_s=ROUND_TIMEOUT_S)

    def open_round(self, config: dict[str, Any]) -> dict[str, Any]:
        """Open a collecting round."""
        return dict(self._ok(self.aggregator.post("/v1/rounds", json=config, headers=self.headers)))

    def round_state(self, round_id: int) -> str:
        """The round's state: collecting, aggregating, published, failed or cancelled."""
        state = self._ok(self.aggregator.get(f"/v1/rounds/{round_id}", headers=self.headers))
        return str(state["state"])

    def wait_published(self, round_id: int, timeout_s: float = ROUND_TIMEOUT_S) -> dict[str, Any]:
        """Poll until the worker has published the round (or it failed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self._ok(self.aggregator.get(f"/v1/rounds/{round_id}", headers=self.headers))
            if state["state"] == "published":
                return dict(state)
            if state["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"round {round_id} {state['state']}: {state.get('error')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {round_id} still {state['state']} after {timeout_s}s")
            time.sleep(0.5)

    def disable(self, client_id: int) -> None:
        """Take a device out of future clusterings."""
        self._ok(
            self.aggregator.patch(
                f"/v1/clients/{client_id}", json={"disabled": True}, headers=self.headers
            )
        )


def device_pool(workers: int) -> ProcessPoolExecutor:
    """Processes that run device rounds, each with its base model loaded once; reusable across
    simulations (the demo runs every method in one pool)."""
    from tessera.sim.devices import init_process

    threads = max(1, 2 // workers)
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=init_process, initargs=(threads,)
    )


def simulate(
    config: SimConfig,
    *,
    aggregator_url: str,
    clustering_url: str,
    operator_token: str,
    work_dir: Path,
    log: Callable[[str], None] = print,
    pool: Executor | None = None,
    round_options: Mapping[str, Any] | None = None,
    keep_devices: bool = False,
    stragglers: Stragglers | None = None,
    buffering: Buffering | None = None,
) -> SimReport:
    """Run the whole simulation against live services and return what it measured.

    `round_options` are added to every round the operator opens (e.g. a private round's
    `noise_multiplier`, `clip`, `clip_norm`, `weighting`), `stragglers` makes some devices
    slow and `buffering` runs one buffered round instead of sync rounds; none is part of
    `config`, so runs saved under a configuration's digest are unaffected. At the end the
    devices are disabled, so that a later simulation on the same stack clusters only its own,
    unless `keep_devices` (a stack left running for the console to show)."""
    from sklearn.metrics import adjusted_rand_score

    started = time.perf_counter()
    operator = Operator(
        aggregator_url=aggregator_url, clustering_url=clustering_url, token=operator_token
    )
    styles = config.chosen_styles()
    run_id = f"{config.method}-{int(time.time() * 1000) % 10**8}"
    devices = _enrol(config, styles, run_id, aggregator_url, operator_token, work_dir, log)
    clustering = operator.recluster(config.seed)
    found = {member: c["label"] for c in clustering["clusters"] for member in c["members"]}
    ours = [d for d in devices if d.client_id in found]
    ari = float(adjusted_rand_score([d.style for d in ours], [found[d.client_id] for d in ours]))
    clusters = [
        {
            "label": c["label"],
            "size": c["size"],
            "true_styles": _count([d.style for d in ours if found[d.client_id] == c["label"]]),
        }
        for c in clustering["clusters"]
    ]
    log(f"   clustering v{clustering['version']}: {len(clusters)} clusters, ARI {ari:.3f}")
    serving = operator if config.method != "local" else None  # local: enrolled, never served
    federation = _Federation(
        config,
        styles,
        devices,
        found,
        work_dir,
        serving,
        aggregator_url,
        dict(round_options or {}),
        stragglers or Stragglers(),
        buffering,
    )
    rounds = federation.run(pool, log)
    if not keep_devices:
        for device in devices:
            operator.disable(device.client_id)
    return SimReport(
        config=asdict(config),
        devices=[
            {"client_id": d.client_id, "style": d.style, "cluster": found.get(d.client_id)}
            for d in devices
        ],
        clusters=clusters,
        ari=ari,
        rounds=rounds,
        seconds=time.perf_counter() - started,
    )


def simulate_local(
    config: SimConfig,
    *,
    work_dir: Path,
    log: Callable[[str], None] = print,
    pool: Executor | None = None,
) -> SimReport:
    """The `local` method: the same devices, each training alone; no server is involved."""
    if config.method != "local":
        raise ValueError(f"simulate_local runs the local method, not {config.method!r}")
    started = time.perf_counter()
    styles = config.chosen_styles()
    devices = [
        Device(i + 1, f"local-{i:03d}", "", styles[i % len(styles)], i // len(styles))
        for i in range(config.devices)
    ]
    log(f"   {len(devices)} devices over {', '.join(styles)}, each training alone (no server)")
    rounds = _Federation(config, styles, devices, {}, work_dir).run(pool, log)
    return SimReport(
        config=asdict(config),
        devices=[{"client_id": d.client_id, "style": d.style, "cluster": None} for d in devices],
        clusters=[],
        ari=None,
        rounds=rounds,
        seconds=time.perf_counter() - started,
    )


@dataclass
class _Federation:
    """The round loop shared by every method: open a round (unless local), run each device's
    round in the pool, wait for the aggregate, summarise."""

    config: SimConfig
    styles: tuple[str, ...]
    devices: list[Device]
    found: dict[int, int]
    work_dir: Path
    operator: Operator | None = None
    aggregator_url: str = ""
    round_options: dict[str, Any] = field(default_factory=dict)
    stragglers: Stragglers = field(default_factory=Stragglers)
    buffering: Buffering | None = None

    def run(self, pool: Executor | None, log: Callable[[str], None]) -> list[RoundReport]:
        if pool is None:
            with device_pool(self.config.workers) as own:
                return self.run(own, log)
        if self.buffering is not None and self.operator is not None:
            return self._buffered(self.buffering, self.operator, pool, log)
        return [self._round(number, pool, log) for number in range(1, self.config.rounds + 1)]

    def _round(self, number: int, pool: Executor, log: Callable[[str], None]) -> RoundReport:
        config, operator = self.config, self.operator
        started = time.perf_counter()
        round_id = None
        if operator is not None:
            options = {**_round_config(config, len(self.devices)), **self.round_options}
            round_id = operator.open_round(options)["id"]
        jobs = [
            _job(
                config,
                d,
                number,
                round_id,
                self.aggregator_url,
                self.work_dir,
                compute_factor=self.stragglers.factor_of(position),
            )
            for position, d in enumerate(self.devices)
        ]
        with ThreadPoolExecutor(len(jobs)) as turns:
            results = list(turns.map(lambda job: _turn(pool, job), jobs))
        published: list[str] = []
        if operator is not None and round_id is not None:
            state = operator.wait_published(round_id)
            published = [f"{v['name']} v{v['version']}" for v in state["published"]]
        report = _summarise(number, results, time.perf_counter() - started, published)
        if config.hybrid_images:
            report.hybrid = _hybrid(
                config, self.styles, self.devices, self.found, operator, self.work_dir
            )
        log(
            f"   round {number}: held-out loss {report.heldout_loss:.4f}, style accuracy "
            f"{report.style_accuracy:.2f}, {report.seconds:.0f}s"
        )
        return report

    def _buffered(
        self, buffering: Buffering, operator: Operator, pool: Executor, log: Callable[[str], None]
    ) -> list[RoundReport]:
        """One buffered round: every device trains, sends and trains again until the round has
        its versions; report n holds each device's n-th local round (slow devices do fewer)."""
        from tessera.sdk.http import ApiError

        config = self.config
        started = time.perf_counter()
        options = {
            **_round_config(config, len(self.devices)),
            **self.round_options,
            "mode": "buffered",
            "buffer_k": buffering.k,
            "buffer_versions": buffering.versions_for(config),
            "lam": 0.0,  # a flush has no other cluster's new adapter to blend with
            "deadline_s": ROUND_TIMEOUT_S * config.rounds,
        }
        round_id = operator.open_round(options)["id"]
        done: list[tuple[int, float, DeviceRoundResult]] = []  # (local round, at, result)
        lock = threading.Lock()

        def local_rounds(position: int, device: Device) -> None:
            for number in itertools.count(1):
                if operator.round_state(round_id) != "collecting":
                    return
                factor = self.stragglers.factor_of(position)
                job = _job(
                    config,
                    device,
                    number,
                    round_id,
                    self.aggregator_url,
                    self.work_dir,
                    compute_factor=factor,
                )
                try:
                    result = _turn(pool, job)
                except ApiError as error:
                    if error.status == 409:  # the round was published while it trained
                        return
                    raise
                with lock:
                    done.append((number, time.perf_counter() - started, result))

        with ThreadPoolExecutor(len(self.devices)) as loops:
            list(loops.map(local_rounds, range(len(self.devices)), self.devices))
        state = operator.wait_published(round_id)
        published = [f"{v['name']} v{v['version']}" for v in state["published"]]
        reports = []
        for number in sorted({n for n, _, _ in done}):
            results = [r for n, _, r in done if n == number]
            seconds = max(at for n, at, _ in done if n == number)
            reports.append(_summarise(number, results, seconds, []))
        if reports:
            reports[-1].published = published
        log(
            f"   buffered round: {len(published)} versions from {len(done)} updates "
            f"in {time.perf_counter() - started:.0f}s"
        )
        return reports


def _turn(pool: Executor, job: DeviceJob) -> DeviceRoundResult:
    """One device round: trained in the pool, then waited out and sent from this thread."""
    from tessera.sim.devices import finish_device_round, run_device_round

    return finish_device_round(job, pool.submit(run_device_round, job).result())


def _hybrid(
    config: SimConfig,
    styles: tuple[str, ...],
    devices: list[Device],
    found: dict[int, int],
    operator: Operator | None,
    work_dir: Path,
) -> dict[str, Any] | None:
    """Score the equal hybrid of the adapters two styles' devices are served this round."""
    from tessera.sim.devices import cached_base
    from tessera.sim.hybrid import hybrid_pair, hybrid_score, style_adapter
    from tessera.sim.report import published_adapters

    pair = hybrid_pair(styles)
    if pair is None:
        return None
    base = cached_base(config.model)
    published = {}
    if operator is not None:
        published = published_adapters(str(operator.aggregator.base_url), operator.token, base)
    members = [(d.name, d.style, found.get(d.client_id)) for d in devices]
    adapters = [
        style_adapter(
            style,
            method=config.method,
            members=members,
            published=published,
            work_dir=work_dir,
            base=base,
        )
        for style in pair
    ]
    if adapters[0] is None or adapters[1] is None:
        return None
    scores = hybrid_score(
        base,
        (adapters[0], adapters[1]),
        pair,
        images=config.hybrid_images,
        steps=config.eval_steps,
        seed=config.seed,
    )
    return scores.to_dict()


def _enrol(
    config: SimConfig,
    styles: tuple[str, ...],
    run_id: str,
    aggregator_url: str,
    operator_token: str,
    work_dir: Path,
    log: Callable[[str], None],
) -> list[Device]:
    from tessera.sdk.device import DeviceClient

    devices: list[Device] = []
    for i in range(config.devices):
        style = styles[i % len(styles)]
        index = i // len(styles)
        name = f"sim-{run_id}-{i:03d}"
        client = DeviceClient.enrol(
            aggregator_url=aggregator_url,
            operator_token=operator_token,
            name=name,
            state_dir=work_dir / name,
        )
        profile = make_device(style, index, config.seed)
        client.upload_task_descriptions(profile.descriptions)
        devices.append(Device(client.client_id, name, client.token, style, index))
    log(f"   {len(devices)} devices enrolled over {', '.join(styles)}; task vectors uploaded")
    return devices


def _round_config(config: SimConfig, devices: int) -> dict[str, Any]:
    if config.method == "secure":
        # linear aggregation (docs/secure_aggregation.md); a cluster's devices reach the protocol
        # as the pool finishes training them, so a phase may wait as long as the round
        return {
            "method": "secure",
            "scope": "cluster",
            "rank": config.rank,
            "min_updates": devices,
            "deadline_s": ROUND_TIMEOUT_S,
            "lam": 0.0,
            "robust": "none",
            "temperature": config.temperature,
            "secure": {"phase_s": ROUND_TIMEOUT_S},
        }
    scope = "global" if config.method == "global" else "cluster"
    method = "exact" if config.method == "exact" else "fedavg"
    return {
        "method": method,
        "scope": scope,
        "rank": config.rank,
        "min_updates": devices,
        "deadline_s": ROUND_TIMEOUT_S,
        "lam": config.lam if scope == "cluster" else 0.0,
        "temperature": config.temperature,
    }


def _job(
    config: SimConfig,
    device: Device,
    number: int,
    round_id: int | None,
    aggregator_url: str,
    work_dir: Path,
    *,
    compute_factor: float = 1.0,
) -> DeviceJob:
    from tessera.sim.devices import DeviceJob

    return DeviceJob(
        aggregator_url=aggregator_url,
        token=device.token,
        client_id=device.client_id,
        state_dir=str(work_dir / device.name),
        style=device.style,
        index=device.index,
        seed=config.seed,
        round_number=number,
        round_id=round_id,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        rank=config.rank,
        samples=config.samples,
        eval_images=config.eval_images,
        eval_steps=config.eval_steps,
        model=config.model,
        compute_factor=compute_factor,
        secure=config.method == "secure",
    )


def _summarise(
    number: int, results: list[DeviceRoundResult], seconds: float, published: list[str]
) -> RoundReport:
    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    return RoundReport(
        round=number,
        heldout_loss=mean([r.heldout_loss for r in results]),
        style_accuracy=mean([r.style_share for r in results]),
        content_accuracy=mean([r.content_accuracy for r in results]),
        train_loss=mean([r.train_loss for r in results]),
        bytes_up_per_device=mean([float(r.bytes_up) for r in results]),
        bytes_down_per_device=mean([float(r.bytes_down) for r in results]),
        seconds=seconds,
        published=published,
        train_seconds_per_device=mean([r.train_seconds for r in results]),
    )


def _count(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts
