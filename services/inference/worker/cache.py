"""The adapter cache of an inference process: LoRA adapters (and hot merged mixes), LRU by bytes.

Everything it keeps counts in one byte budget (TESSERA_ADAPTER_CACHE_BYTES):

- an *adapter* version, keyed by version id, read from the object store with its sha256 checked,
  validated against the base model's LoRA spec, then cast once to the model's device and dtype:
  it costs its own A and B tensors there, nothing else;
- optionally (`merge_after`), the *merged* weights of a mix asked for that many times, keyed by
  the sorted (version id, weight) pairs, weights quantised (`mix_key`), when they take at most
  half the budget. A merged mix owns only its merged weights, never its adapters' tensors.

A batch whose jobs carry different mixes (`batch_mix`) runs them as one per-sample mix over the
same cached adapters: the stacks it builds (and, within `sample_merge_bytes`, each image's merged
weights of the layers whose LoRA costs most) belong to the batch, not to the cache.

A mix is served unmerged by default (`tessera.lora.mixing.unmerged_mix`): it references its
cached adapters' tensors, is built per call in microseconds and owns no memory, so no mix ever
costs a copy of the UNet's weights unless merging is turned on and the budget has room.

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

import torch
from sqlalchemy.orm import Session, sessionmaker

from services.inference import crud
from services.inference.mixes import quantise_weight
from tessera.lora import LoraAdapter
from tessera.lora.files import validate_adapter_bytes
from tessera.lora.mixing import (
    ActiveMix,
    install_mixing,
    merge_mix,
    per_sample_mix,
    place_adapter,
    tensor_bytes,
    unmerged_mix,
)
from tessera.metrics import (
    ADAPTER_CACHE_BYTES,
    ADAPTER_CACHE_EVICTIONS,
    ADAPTER_CACHE_HITS,
    ADAPTER_CACHE_MISSES,
)
from tessera.model.base import BaseModel
from tessera.storage import ObjectStore

log = logging.getLogger(__name__)

MixKey = tuple[tuple[int, float], ...]
_Key = tuple[str, Any]
MAX_TRACKED_MIXES = 1024  # mixes whose use counts are kept for `merge_after`


class UnknownVersionError(LookupError):
    """No adapter version with this id (or name) is published."""


@dataclass(frozen=True)
class CachedAdapter:
    """An adapter version as the cache holds it: its tensors on the model's device and dtype."""

    version_id: int
    name: str
    version: int
    adapter: LoraAdapter
    nbytes: int


@dataclass(frozen=True)
class PreparedMix:
    """What a job runs with: the active mix (None: the base alone), and what it cost."""

    active: ActiveMix | None
    adapters: tuple[CachedAdapter, ...]
    key: MixKey
    cached: bool  # nothing had to be read from the store (nor merged)
    loaded: tuple[int, ...]  # version ids this call had to read from the object store

    @property
    def merged(self) -> ActiveMix | None:
        """The active mix, under the name callers used when every mix was merged."""
        return self.active

    @property
    def is_merged(self) -> bool:
        return self.active is not None and bool(self.active.merged)


@dataclass
class CacheStats:
    """This cache's own counts (the Prometheus metrics add up every cache of the process)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    merges: int = 0  # mixes merged because they were hot
    loads: list[int] = field(default_factory=list)  # version ids read from the store, in order


@dataclass(frozen=True)
class _Entry:
    value: Any
    nbytes: int


def mix_key(pins: Sequence[tuple[int, float]]) -> MixKey:
    """The canonical key of a mix: (version id, quantised weight) pairs with weight > 0, sorted;
    the mix runs with the quantised weights, so one key is one mix."""
    quantised = ((int(v), quantise_weight(w)) for v, w in pins)
    return tuple(sorted((v, w) for v, w in quantised if w > 0))


class AdapterCache:
    """Thread-safe LRU of adapter versions (and hot merged mixes) for one base model."""

    def __init__(
        self,
        *,
        base: BaseModel,
        sessions: sessionmaker[Session],
        store: ObjectStore,
        max_bytes: int,
        merge_after: int = 0,
        sample_merge_bytes: int = 0,
    ) -> None:
        """`merge_after`: merge a mix once asked for that many times (0: never merge);
        `sample_merge_bytes`: what a batch of different mixes may spend on per-image merged
        weights (`per_sample_mix`'s `merge_bytes`; 0: LoRA pairs everywhere)."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, found {max_bytes}")
        if merge_after < 0:
            raise ValueError(f"merge_after must be >= 0, found {merge_after}")
        if sample_merge_bytes < 0:
            raise ValueError(f"sample_merge_bytes must be >= 0, found {sample_merge_bytes}")
        self.base = base
        self.spec = base.lora_spec
        self.sessions = sessions
        self.store = store
        self.max_bytes = max_bytes
        self.merge_after = merge_after
        self.sample_merge_bytes = sample_merge_bytes
        self.stats = CacheStats()
        self._uses: OrderedDict[MixKey, int] = OrderedDict()
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

    def held_bytes(self) -> int:
        """A recount: bytes of every tensor the entries reference, each counted once (what
        `nbytes` says, if every entry is accounted for)."""
        with self._lock:
            tensors: list[torch.Tensor] = []
            for entry in self._entries.values():
                if isinstance(entry.value, CachedAdapter):
                    tensors += entry.value.adapter.tensors.values()
                else:  # a merged mix: its merged weights, and any adapter term it kept
                    mix: ActiveMix = entry.value
                    tensors += mix.merged.values()
                    tensors += [
                        t for terms in mix.terms.values() for x in terms for t in (x.a, x.b)
                    ]
        return tensor_bytes(tensors)

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

    def mix(self, pins: Sequence[tuple[int, float]], *, merge: bool = True) -> PreparedMix:
        """The mix of (version id, weight) pairs over cached adapters: unmerged, or its merged
        weights when it is hot (`merge_after`) and they fit in half the budget. `merge=False`:
        always unmerged (a batch whose samples carry different mixes), and not counted as a use.
        """
        key = mix_key(pins)
        if not key:
            return PreparedMix(active=None, adapters=(), key=key, cached=True, loaded=())
        merged = self._cached_merge(key) if merge else None
        if merged is not None:
            return PreparedMix(active=merged, adapters=(), key=key, cached=True, loaded=())
        loaded: list[int] = []
        adapters = []
        for version_id, _ in key:
            adapter, hit = self._get(version_id)
            adapters.append(adapter)
            if not hit:
                loaded.append(version_id)
        held = tuple(adapters)
        mix = [(a.adapter, w) for a, (_, w) in zip(held, key, strict=True)]
        label = "+".join(
            f"{a.name}@v{a.version}x{w:g}" for a, (_, w) in zip(held, key, strict=True)
        )
        if merge and self._is_hot(key) and self._merged_bytes(mix) <= self.max_bytes // 2:
            entry, hit = self._get_or_load(
                ("merged", key),
                lambda: self._merge(mix, label),
            )
            return PreparedMix(
                entry.value, held, key, cached=hit and not loaded, loaded=tuple(loaded)
            )
        active = unmerged_mix(self.base.unet, self.spec, mix, label=label, placed=True)
        return PreparedMix(active, held, key, cached=not loaded, loaded=tuple(loaded))

    def batch_mix(
        self, mixes: Sequence[Sequence[tuple[int, float]]], counts: Sequence[int]
    ) -> tuple[list[PreparedMix], ActiveMix | None]:
        """For a batch of jobs (`counts[i]` images under `mixes[i]`): each job's mix, and what
        the UNet runs with. Jobs that share one mix run it as `mix` would (merged if hot); jobs
        with different mixes run a per-sample mix, each image under its own job's mix."""
        keys = [mix_key(pins) for pins in mixes]
        if len(set(keys)) == 1:
            shared = self.mix(keys[0])
            return [shared] * len(keys), shared.active
        distinct = {key: self.mix(key, merge=False) for key in dict.fromkeys(keys)}
        prepared = [distinct[key] for key in keys]
        samples = [job.active for job, n in zip(prepared, counts, strict=True) for _ in range(n)]
        merged = per_sample_mix(samples, unet=self.base.unet, merge_bytes=self.sample_merge_bytes)
        return prepared, merged

    def _cached_merge(self, key: MixKey) -> ActiveMix | None:
        if self.merge_after <= 0:
            return None
        with self._lock:
            entry = self._entries.get(("merged", key))
            if entry is None:
                return None
            self._entries.move_to_end(("merged", key))
            merged: ActiveMix = entry.value
            return merged

    def _is_hot(self, key: MixKey) -> bool:
        """Count one use of the mix; whether it has now been asked for `merge_after` times."""
        if self.merge_after <= 0:
            return False
        with self._lock:
            uses = self._uses.pop(key, 0) + 1
            self._uses[key] = uses
            while len(self._uses) > MAX_TRACKED_MIXES:
                self._uses.popitem(last=False)
        return uses >= self.merge_after

    def _merge(self, mix: list[tuple[LoraAdapter, float]], label: str) -> _Entry:
        merged = merge_mix(self.base.unet, self.spec, mix, label=label)
        with self._lock:
            self.stats.merges += 1
        return _Entry(merged, merged.nbytes)

    def _merged_bytes(self, mix: list[tuple[LoraAdapter, float]]) -> int:
        """What merging would cost: a copy of every weight the mix touches."""
        modules = {module for adapter, _ in mix for module in adapter.modules}
        weights = [self.base.unet.get_submodule(module).weight for module in modules]
        return tensor_bytes(weights)

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
        # Cast once, here: the host float32 copy is dropped, the adapter costs its own tensors.
        adapter = place_adapter(self.base.unet, validate_adapter_bytes(data, self.spec))
        nbytes = tensor_bytes(adapter.tensors)
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
    return any(version_id in version_ids for version_id, _ in value)  # a merged mix
