"""The inference worker process's state: connections, the base model, the adapter cache and
its event listener. Built once per process (after fork), on first use or at process start."""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING

from services.inference.worker.cache import AdapterCache
from services.inference.worker.listener import AdapterEventListener
from services.inference.worker.runner import JobRuntime
from tessera.config import Settings, get_settings
from tessera.queue import visibility_timeout_s
from tessera.service.resources import Resources

if TYPE_CHECKING:
    from tessera.model.base import BaseModel

log = logging.getLogger(__name__)

_lock = threading.Lock()
_resources: Resources | None = None
_runtime: JobRuntime | None = None
_listener: AdapterEventListener | None = None


# With TESSERA_ADAPTER_CACHE_BYTES unset: room for this many adapters of the spec's largest
# rank in the model's dtype, when that is more than the setting's default.
DEFAULT_CACHED_ADAPTERS = 8


def cache_bytes(settings: Settings, base: BaseModel) -> int:
    """TESSERA_ADAPTER_CACHE_BYTES if set, else the larger of its default and room for
    DEFAULT_CACHED_ADAPTERS adapters of rank `max_rank` for this model."""
    if "adapter_cache_bytes" in settings.model_fields_set:
        return settings.adapter_cache_bytes
    spec = base.lora_spec
    values = sum(
        spec.max_rank * (shape[0] + math.prod(shape[1:])) for shape in spec.modules.values()
    )
    adapter = values * base.dtype.itemsize
    return max(settings.adapter_cache_bytes, DEFAULT_CACHED_ADAPTERS * adapter)


def build_runtime(settings: Settings, resources: Resources) -> JobRuntime:
    """Load the base model (TESSERA_DEVICE, TESSERA_DTYPE) and make an empty adapter cache."""
    from tessera.model.base import load_base_model

    base = load_base_model(
        settings.base_model,
        device=settings.device,
        dtype=settings.dtype,
        targets=settings.lora_targets,  # auto: the model folder's recommended preset
    )
    cache = AdapterCache(
        base=base,
        sessions=resources.sessions,
        store=resources.store,
        max_bytes=cache_bytes(settings, base),
        sample_merge_bytes=settings.inference_sample_merge_bytes,
    )
    return JobRuntime(
        sessions=resources.sessions,
        store=resources.store,
        redis=resources.redis,
        base=base,
        cache=cache,
        max_batch_images=settings.inference_max_batch_images,
        stale_s=settings.task_stale_s,
        message_ttl_s=visibility_timeout_s(settings) + 300,  # past the latest redelivery
    )


def runtime() -> JobRuntime:
    """This process's runtime, built (and its adapter-event listener started) on first call."""
    global _resources, _runtime, _listener
    with _lock:
        if _runtime is None:
            settings = get_settings()
            _resources = Resources(settings)
            _runtime = build_runtime(settings, _resources)
            if settings.redis_url:
                _listener = AdapterEventListener(
                    redis_url=settings.redis_url, cache=_runtime.cache
                ).start()
            log.info("inference runtime ready", extra={"device": str(_runtime.base.device)})
        return _runtime


def use_runtime(prepared: JobRuntime | None) -> None:
    """Make `prepared` this process's runtime (an in-process worker: tests, benchmarks)."""
    global _runtime
    with _lock:
        _runtime = prepared


def reset_after_fork() -> None:
    """Drop what a forked pool process inherited (its connections belong to the parent)."""
    global _resources, _runtime, _listener
    with _lock:
        if _resources is not None and _resources.opened("engine"):
            _resources.engine.dispose(close=False)
        _resources, _runtime, _listener = None, None, None


def close() -> None:
    global _resources, _runtime, _listener
    with _lock:
        if _listener is not None:
            _listener.stop()
        if _resources is not None:
            _resources.close()
        _resources, _runtime, _listener = None, None, None
