"""The adapter cache of an inference process: LoRA adapters and merged mixes, LRU by bytes.

Two kinds of entry share one byte budget (TESSERA_ADAPTER_CACHE_BYTES):

- an *adapter* version (host float32 tensors), keyed by version id, read from the object store
  with its sha256 checked and validated against the base model's LoRA spec;
- a *merged mix* (`tessera.lora.mixing.MergedMix`: the merged target-layer weights of a blend,
  on the model's device), keyed by the sorted (version id, weight) pairs, so that jobs that
  share a mix share one merge and switching between cached mixes costs nothing.

Callers hold references: evicting an entry, or replacing an adapter's version on an "adapter
published" event (`refresh`), never pulls weights from under a job that already has them.
Loads happen outside the lock, once per key however many threads ask at the same time.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from tessera.lora import LoraAdapter
from tessera.lora.files import validate_adapter_bytes
from tessera.lora.mixing import MergedMix, install_mixing
from tessera.metrics import (
    ADAPTER_CACHE_BYTES,
    ADAPTER_CACHE_EVICTIONS,
    ADAPTER_CACHE_HITS,
    ADAPTER_CACHE_MISSES,
)
from tessera.model.base import BaseModel
from tessera.model.generate import prepare_mix
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)

MixKey = tuple[tuple[int, float], ...]
_Key = tuple[str, Any]


class UnknownVersionError(LookupError):
    """No adapter version with this id (or name) is published."""


@dataclass(frozen=True)
class CachedAdapter:
    """An adapter version as the cache holds it."""

    version_id: int
    name: str
    version: int
    adapter: LoraAdapter
    nbytes: int


@dataclass(frozen=True)
class PreparedMix:
    """What a job runs with: the merged mix (None: the base alone), and what it cost."""

    merged: MergedMix | None
    adapters: tuple[CachedAdapter, ...]
    key: MixKey
    cached: bool  # the merge was in the cache
    loaded: tuple[int, ...]  # version ids this call had to read from the object store


@dataclass
class CacheStats:
    """This cache's own counts (the Prometheus metrics add up every cache of the process)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    mix_hits: int = 0
    mix_misses: int = 0
    loads: list[int] = field(default_factory=list)  # version ids read from the store, in order


@dataclass(frozen=True)
class _Entry:
    value: Any
    nbytes: int


def mix_key(pins: Sequence[tuple[int, float]]) -> MixKey:
    """The canonical key of a mix: (version id, weight) pairs with weight > 0, sorted."""
    return tuple(sorted((int(v), float(w)) for v, w in pins if w > 0))


class AdapterCache:
    """Thread-safe LRU of adapter versions and merged mixes for one base model."""

    def __init__(
        self,
        *,
        base: BaseModel,
        sessions: sessionmaker[Session],
        store: ObjectStore,
        max_bytes: int,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, found {max_bytes}")
        self.base = base
        self.spec = base.lora_spec
        self.sessions = sessions
        self.store = store
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._loading: dict[_Key, Future[_Entry]] = {}
        self._latest: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        install_mixing(base.unet, self.spec)  # once, before any job runs on the UNet

    # -- reading ------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def cached_versions(self) -> list[int]:
        """Version ids of the adapters held now, least recently used first."""
        with self._lock:
            return [key[1] for key in self._entries if key[0] == "adapter"]

    def resolve(self, ref: str | int) -> int:
        """The version id `ref` names: itself if numeric, else the latest version of that name."""
        if isinstance(ref, int) or ref.isdigit():
            return int(ref)
        with self._lock:
            known = self._latest.get(ref)
        if known is not None:
            return known
        with self.sessions() as session:
            version = crud.latest_version(session=session, name=ref)
        if version is None:
            raise UnknownVersionError(f"no published adapter named {ref!r}")
        with self._lock:
            self._latest[ref] = max(version.id, self._latest.get(ref, 0))
            return self._latest[ref]

    def get(self, version_id: int) -> CachedAdapter:
        """An adapter version, from the cache or else the object store (then cached)."""
        return self._get(version_id)[0]

    def _get(self, version_id: int) -> tuple[CachedAdapter, bool]:
        entry, hit = self._get_or_load(("adapter", version_id), lambda: self._load(version_id))
        with self._lock:
            if hit:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
        (ADAPTER_CACHE_HITS if hit else ADAPTER_CACHE_MISSES).inc()
        cached: CachedAdapter = entry.value
        return cached, hit

    def mix(self, pins: Sequence[tuple[int, float]]) -> PreparedMix:
        """The merged mix of (version id, weight) pairs, built once and cached."""
        key = mix_key(pins)
        if not key:
            return PreparedMix(merged=None, adapters=(), key=key, cached=True, loaded=())
        loaded: list[int] = []

        def build() -> _Entry:
            adapters = []
            for version_id, _ in key:
                adapter, hit = self._get(version_id)
                adapters.append(adapter)
                if not hit:
                    loaded.append(version_id)
            weights = [w for _, w in key]
            merged = prepare_mix(
                self.base, [(a.adapter, w) for a, w in zip(adapters, weights, strict=True)]
            )
            assert merged is not None
            label = "+".join(
                f"{a.name}@v{a.version}x{w:g}" for a, w in zip(adapters, weights, strict=True)
            )
            merged = MergedMix(weights=merged.weights, label=label, nbytes=merged.nbytes)
            return _Entry((merged, tuple(adapters)), merged.nbytes)

        entry, hit = self._get_or_load(("mix", key), build)
        with self._lock:
            if hit:
                self.stats.mix_hits += 1
            else:
                self.stats.mix_misses += 1
        merged, held = entry.value
        return PreparedMix(merged=merged, adapters=held, key=key, cached=hit, loaded=tuple(loaded))

    # -- hot swap -----------------------------------------------------------------------------

    def refresh(self, event: Mapping[str, Any]) -> None:
        """On "adapter published": the name now means the new version, which is loaded ahead;
        cached older versions of that name, and the mixes built on them, are dropped."""
        name, version_id = str(event["adapter"]), int(event["version_id"])
        with self._lock:
            previous = self._latest.get(name)
            if previous is not None and previous > version_id:
                return  # a late, older event
            self._latest[name] = version_id
            stale = {
                key[1]
                for key, entry in self._entries.items()
                if key[0] == "adapter"
                and entry.value.name == name
                and entry.value.version_id != version_id
            }
            dropped = self._drop(lambda key: _uses_any(key, stale))
        self.get(version_id)  # warm: the next job that asks for `name` finds it here
        log.info(
            "adapter cache refreshed",
            extra={"adapter": name, "version_id": version_id, "dropped": dropped},
        )

    def resync(self) -> None:
        """Catch up with versions published while no event could arrive (e.g. Redis was down)."""
        with self._lock:
            names = list(self._latest)
        for name in names:
            with self.sessions() as session:
                version = crud.latest_version(session=session, name=name)
            if version is not None:
                self.refresh({"adapter": name, "version_id": version.id})

    # -- internals ----------------------------------------------------------------------------

    def _load(self, version_id: int) -> _Entry:
        with self.sessions() as session:
            found = crud.version_with_name(session=session, version_id=version_id)
        if found is None:
            raise UnknownVersionError(f"no adapter version with id {version_id}")
        name, row = found
        data = self.store.get_bytes(row.object_key, expected_sha256=row.sha256)
        adapter = validate_adapter_bytes(data, self.spec)
        nbytes = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
        with self._lock:
            self.stats.loads.append(version_id)
        return _Entry(CachedAdapter(version_id, name, row.version, adapter, nbytes), nbytes)

    def _get_or_load(self, key: _Key, load: Callable[[], _Entry]) -> tuple[_Entry, bool]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry, True
            pending = self._loading.get(key)
            if pending is None:
                future: Future[_Entry] = Future()
                self._loading[key] = future
        if pending is not None:
            return pending.result(), True  # another thread's load: no store read here
        try:
            entry = load()
        except BaseException as error:
            with self._lock:
                del self._loading[key]
            future.set_exception(error)
            raise
        with self._lock:
            del self._loading[key]
            if entry.nbytes <= self.max_bytes:
                self._entries[key] = entry
                self._bytes += entry.nbytes
                self._evict_over_budget()
            ADAPTER_CACHE_BYTES.set(self._bytes)
        future.set_result(entry)
        return entry, False

    def _evict_over_budget(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
            self.stats.evictions += 1
            ADAPTER_CACHE_EVICTIONS.inc()

    def _drop(self, doomed: Callable[[_Key], bool]) -> int:
        keys = [key for key in self._entries if doomed(key)]
        for key in keys:
            self._bytes -= self._entries.pop(key).nbytes
            self.stats.evictions += 1
            ADAPTER_CACHE_EVICTIONS.inc()
        ADAPTER_CACHE_BYTES.set(self._bytes)
        return len(keys)


def _uses_any(key: _Key, version_ids: set[int]) -> bool:
    kind, value = key
    if kind == "adapter":
        return value in version_ids
    return any(version_id in version_ids for version_id, _ in value)
