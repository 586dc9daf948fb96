"""The inference worker process's state: connections, the base model, the adapter cache and
its event listener. Built once per process (after fork), on first use or at process start."""

from __future__ import annotations

import logging
import threading

from services.inference.worker.cache import AdapterCache
from services.inference.worker.listener import AdapterEventListener
from services.inference.worker.runner import JobRuntime
from tessera.config import Settings, get_settings
from tessera.service.resources import Resources

log = logging.getLogger(__name__)

_lock = threading.Lock()
_resources: Resources | None = None
_runtime: JobRuntime | None = None
_listener: AdapterEventListener | None = None


def model_device() -> str:
    """The accelerator when there is one: the base model and merged mixes live there."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_runtime(settings: Settings, resources: Resources) -> JobRuntime:
    """Load the base model and make an empty cache of TESSERA_ADAPTER_CACHE_BYTES."""
    from tessera.model.base import load_base_model

    base = load_base_model(settings.base_model, device=model_device())
    cache = AdapterCache(
        base=base,
        sessions=resources.sessions,
        store=resources.store,
        max_bytes=settings.adapter_cache_bytes,
    )
    return JobRuntime(
        sessions=resources.sessions,
        store=resources.store,
        redis=resources.redis,
        base=base,
        cache=cache,
        max_batch_images=settings.inference_max_batch_images,
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
