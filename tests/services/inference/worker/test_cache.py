"""The adapter cache: LRU in bytes, metrics, one load per key, hot swap on a published event."""

from __future__ import annotations

import math
import threading
import time

import pytest
import redis
import torch
from sqlalchemy.orm import Session, sessionmaker

from services.inference.worker.cache import AdapterCache, UnknownVersionError, mix_key
from services.inference.worker.listener import AdapterEventListener
from tessera.config import Settings
from tessera.events import adapter_published_channel
from tessera.lora import LoraSpec, adapter_from_bytes, adapter_to_bytes, random_adapter
from tessera.lora.adapter import A_SUFFIX
from tessera.lora.mixing import SampleWeights, tensor_bytes
from tessera.metrics import (
    ADAPTER_CACHE_BYTES,
    ADAPTER_CACHE_EVICTIONS,
    ADAPTER_CACHE_HITS,
    ADAPTER_CACHE_MISSES,
)
from tessera.model.base import BaseModel
from tessera.model.generate import generate, seeded_latents
from tessera.storage import ChecksumMismatchError, ObjectStore
from tests.services.inference.helpers import announce, publish, tokens

RANK = 4


def adapter_bytes(spec: LoraSpec) -> int:
    """Bytes of one rank-RANK adapter on the float32 CPU model (A and B for every target)."""
    return sum(4 * RANK * (shape[0] + math.prod(shape[1:])) for shape in spec.modules.values())


def make_cache(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, max_bytes: int
) -> AdapterCache:
    return AdapterCache(base=base_model, sessions=sessions, store=store, max_bytes=max_bytes)


def value(metric: object) -> float:
    return float(metric._value.get())  # type: ignore[attr-defined]


def test_the_cache_keeps_the_most_recently_used_within_its_bytes(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> None:
    size = adapter_bytes(spec)
    ids = [
        publish(sessions, store, f"cluster:{i}", random_adapter(spec, RANK, 4.0, seed=i)).version_id
        for i in range(3)
    ]
    cache = make_cache(base_model, sessions, store, max_bytes=int(2.5 * size))
    before = [value(m) for m in (ADAPTER_CACHE_HITS, ADAPTER_CACHE_MISSES, ADAPTER_CACHE_EVICTIONS)]

    cache.get(ids[0])
    cache.get(ids[1])
    cache.get(ids[0])  # hit: ids[0] is now the most recent
    cache.get(ids[2])  # over budget: ids[1], the least recent, goes
    held = cache.cached_versions()
    cache.get(ids[1])  # a miss again

    assert held == [ids[0], ids[2]]
    assert cache.stats.loads == [ids[0], ids[1], ids[2], ids[1]]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 4, 2)
    after = [value(m) for m in (ADAPTER_CACHE_HITS, ADAPTER_CACHE_MISSES, ADAPTER_CACHE_EVICTIONS)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 4, 2]
    assert cache.nbytes == 2 * size == value(ADAPTER_CACHE_BYTES)


def test_a_mix_runs_unmerged_on_its_cached_adapters_and_costs_nothing_more(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> None:
    a = publish(sessions, store, "cluster:0", random_adapter(spec, RANK, 4.0, seed=1)).version_id
    b = publish(sessions, store, "cluster:1", random_adapter(spec, RANK, 4.0, seed=2)).version_id
    cache = make_cache(base_model, sessions, store, max_bytes=64 * 1024 * 1024)

    first = cache.mix([(a, 0.5), (b, 0.5)])
    same = cache.mix([(b, 0.5), (a, 0.5), (a, 0.0)])  # same mix: order and zero weights aside
    other = cache.mix([(a, 1.0)])

    assert not first.cached and sorted(first.loaded) == sorted([a, b])
    assert same.cached and same.loaded == () and same.key == first.key
    assert other.cached and other.loaded == ()  # its adapter was already cached
    assert first.active is not None and not first.is_merged and first.active.nbytes == 0
    # Each cached adapter costs its own tensors, and nothing else is kept: no copy of weights.
    held = {v: cache.get(v).adapter.tensors for v in (a, b)}
    assert cache.nbytes == 2 * adapter_bytes(spec) == sum(map(tensor_bytes, held.values()))
    module = next(iter(spec.modules))
    terms = first.active.terms[module]
    assert {id(term.a) for term in terms} == {id(held[v][module + A_SUFFIX]) for v in (a, b)}
    assert cache.mix([]).active is None  # the base model alone


def test_a_hot_mix_is_merged_once_within_half_the_budget(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> None:
    a = publish(sessions, store, "cluster:0", random_adapter(spec, RANK, 4.0, seed=1)).version_id
    b = publish(sessions, store, "cluster:1", random_adapter(spec, RANK, 4.0, seed=2)).version_id
    cache = AdapterCache(
        base=base_model, sessions=sessions, store=store, max_bytes=64 * 1024 * 1024, merge_after=2
    )
    weights = tensor_bytes([base_model.unet.get_submodule(m).weight for m in spec.modules])
    pins = [(a, 0.5), (b, 0.5)]

    cold = cache.mix(pins)
    hot = cache.mix(pins)
    again = cache.mix(pins)

    assert not cold.is_merged and hot.is_merged and again.active is hot.active
    assert (hot.cached, again.cached, cache.stats.merges) == (False, True, 1)
    assert hot.active is not None and hot.active.nbytes == weights
    assert cache.nbytes == 2 * adapter_bytes(spec) + weights
    prompt = tokens(2).float()
    unmerged = generate(base_model, prompt, steps=2, seed=1, merged=cold.active).images
    merged = generate(base_model, prompt, steps=2, seed=1, merged=hot.active).images
    assert unmerged is not None and merged is not None
    torch.testing.assert_close(unmerged, merged, atol=1e-4, rtol=0)

    small = AdapterCache(
        base=base_model,
        sessions=sessions,
        store=store,
        max_bytes=2 * weights - 1,  # a merge would take more than half
        merge_after=1,
    )
    assert not small.mix(pins).is_merged and small.stats.merges == 0


@pytest.mark.parametrize("merge_bytes", [0, 1 << 30])
def test_a_batch_of_different_mixes_gives_each_image_its_own_mix(
    base_model: BaseModel,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    spec: LoraSpec,
    merge_bytes: int,
) -> None:
    ids = [
        publish(sessions, store, f"cluster:{i}", random_adapter(spec, RANK, 4.0, seed=i)).version_id
        for i in range(3)
    ]
    cache = AdapterCache(
        base=base_model,
        sessions=sessions,
        store=store,
        max_bytes=64 * 1024 * 1024,
        sample_merge_bytes=merge_bytes,
    )
    mixes = [[(ids[0], 0.6), (ids[1], 0.4)], [(ids[1], 0.6), (ids[2], 0.4)], []]
    prompt = torch.cat([tokens(seed) for seed in range(3)]).float()
    noise = torch.cat([seeded_latents(base_model, 1, seed) for seed in range(3)])

    prepared, active = cache.batch_mix(mixes, [1, 1, 1])
    together = generate(base_model, prompt, steps=2, start_latents=noise, merged=active).images

    assert active is not None and active.samples == 3
    merged = {isinstance(s, SampleWeights) for s in active.per_sample.values()}
    assert merged == {bool(merge_bytes)}  # the whole tiny UNet fits in 1 GiB
    assert together is not None
    for i, mix in enumerate(prepared):
        one = prompt[i : i + 1]
        alone = generate(
            base_model, one, steps=2, start_latents=noise[i : i + 1], merged=mix.active
        ).images
        assert alone is not None
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="sample_merge_bytes must be >= 0"):
        AdapterCache(
            base=base_model, sessions=sessions, store=store, max_bytes=1, sample_merge_bytes=-1
        )


def test_threads_asking_for_the_same_adapter_share_one_load(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> None:
    version = publish(sessions, store, "global", random_adapter(spec, RANK, 4.0, seed=3))
    cache = make_cache(base_model, sessions, store, max_bytes=64 * 1024 * 1024)
    start = threading.Barrier(4)
    got = []

    def load() -> None:
        start.wait()
        got.append(cache.get(version.version_id))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert cache.stats.loads == [version.version_id]
    assert len(got) == 4 and all(entry is got[0] for entry in got)


def test_a_tampered_object_or_an_unknown_name_is_refused(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> None:
    version = publish(sessions, store, "cluster:0", random_adapter(spec, RANK, 4.0, seed=4))
    store.put_bytes(version.object_key, b"not the published bytes")
    cache = make_cache(base_model, sessions, store, max_bytes=64 * 1024 * 1024)

    with pytest.raises(ChecksumMismatchError):
        cache.get(version.version_id)
    with pytest.raises(UnknownVersionError):
        cache.resolve("cluster:7")
    with pytest.raises(UnknownVersionError):
        cache.get(987654)
    assert cache.cached_versions() == [] and cache.nbytes == 0


def test_a_published_version_replaces_the_old_one_but_not_under_a_running_job(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> None:
    old_adapter = random_adapter(spec, RANK, 4.0, seed=5, std=0.2)
    old = publish(sessions, store, "cluster:0", old_adapter)
    cache = make_cache(base_model, sessions, store, max_bytes=64 * 1024 * 1024)
    assert cache.resolve("cluster:0") == old.version_id
    in_flight = cache.mix([(old.version_id, 1.0)])  # what a running job holds

    new_adapter = random_adapter(spec, RANK, 4.0, seed=6, std=0.2)
    new = publish(sessions, store, "cluster:0", new_adapter)
    cache.refresh(new.event(round_id=0))

    assert cache.resolve("cluster:0") == new.version_id
    assert cache.cached_versions() == [new.version_id]  # loaded ahead of the next job
    assert cache.mix([(new.version_id, 1.0)]).loaded == ()
    # The job in flight still runs on the old version: it holds the old tensors.
    prompt = tokens(2).float()
    with_held = generate(base_model, prompt, steps=3, seed=1, merged=in_flight.active).images
    as_published = adapter_from_bytes(adapter_to_bytes(old_adapter), spec)  # fp16 on the wire
    with_old = generate(base_model, prompt, [(as_published, 1.0)], steps=3, seed=1).images
    with_new = generate(base_model, prompt, [(new_adapter, 1.0)], steps=3, seed=1).images
    assert with_held is not None and with_old is not None and with_new is not None
    torch.testing.assert_close(with_held, with_old, atol=1e-4, rtol=0)
    assert (with_held - with_new).abs().max() > 1e-2


def test_the_listener_refreshes_the_cache_on_a_published_event(
    base_model: BaseModel,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    spec: LoraSpec,
    settings: Settings,
    broker: redis.Redis,
) -> None:
    cache = make_cache(base_model, sessions, store, max_bytes=64 * 1024 * 1024)
    old = publish(sessions, store, "cluster:2", random_adapter(spec, RANK, 4.0, seed=7))
    cache.get(old.version_id)
    listener = AdapterEventListener(redis_url=settings.redis_url or "", cache=cache).start()
    try:
        assert listener.subscribed.wait(10)
        new = publish(sessions, store, "cluster:2", random_adapter(spec, RANK, 4.0, seed=8))
        broker.publish(adapter_published_channel(broker), "not json")  # ignored, not fatal
        assert announce(broker, new) == 1
        deadline = time.monotonic() + 10
        while cache.cached_versions() != [new.version_id] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        listener.stop()

    assert cache.cached_versions() == [new.version_id]
    assert listener.events_seen == 1


def test_mix_weights_are_quantised_so_float_noise_shares_one_entry(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> None:
    a = publish(sessions, store, "cluster:0", random_adapter(spec, RANK, 4.0, seed=1)).version_id
    b = publish(sessions, store, "cluster:1", random_adapter(spec, RANK, 4.0, seed=2)).version_id
    cache = AdapterCache(
        base=base_model, sessions=sessions, store=store, max_bytes=64 * 1024 * 1024, merge_after=2
    )

    first = cache.mix([(a, 0.5), (b, 0.25)])
    noisy = [cache.mix([(b, 0.25 + 1e-4 * i), (a, 0.5 - 1e-4 * i)]) for i in range(1, 20)]

    assert first.key == mix_key([(a, 0.5), (b, 0.25)]) == ((a, 0.5), (b, 0.25))
    assert all(m.key == first.key for m in noisy)
    assert cache.stats.merges == 1 and all(m.active is noisy[0].active for m in noisy)
    assert mix_key([(a, 0.504), (b, 0.004)]) == ((a, 0.5),)  # a weight under 0.005 is none


def test_everything_the_cache_holds_counts_within_its_budget(
    base_model: BaseModel, sessions: sessionmaker[Session], store: ObjectStore, spec: LoraSpec
) -> None:
    ids = [
        publish(sessions, store, f"cluster:{i}", random_adapter(spec, RANK, 4.0, seed=i)).version_id
        for i in range(5)
    ]
    weights = tensor_bytes([base_model.unet.get_submodule(m).weight for m in spec.modules])
    budget = 2 * weights + 3 * adapter_bytes(spec)  # room for one merged mix and its adapters
    cache = AdapterCache(
        base=base_model, sessions=sessions, store=store, max_bytes=budget, merge_after=1
    )
    generator = torch.Generator().manual_seed(0)

    for _ in range(12):
        picked = torch.randperm(len(ids), generator=generator)[:2].tolist()
        shares = torch.rand(2, generator=generator).tolist()
        prepared = cache.mix([(ids[i], 0.1 + s) for i, s in zip(picked, shares, strict=True)])
        assert prepared.is_merged
        assert cache.held_bytes() == cache.nbytes <= budget

    assert cache.stats.merges >= 6 and cache.stats.evictions > 0
