"""The Prometheus metrics an operator watches; definitions only, recorded where the work happens.

Each is exported on `/metrics` by the process that records it (docs/deploy.md lists them with
their meaning). Labels stay few and bounded: a label value per client, round or adapter would
grow without limit.
"""

from __future__ import annotations

import os
from enum import StrEnum

from prometheus_client import Counter, Gauge, Histogram

# In multiprocess mode (a Celery worker's pool: tessera.worker_metrics) every process writes its
# values to files in this folder as each metric is made, so it must exist before the first one.
if _multiproc_dir := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(_multiproc_dir, exist_ok=True)

HTTP_REQUESTS = Counter(
    "tessera_http_requests_total", "HTTP requests served", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "tessera_http_request_seconds", "HTTP request latency", ["service", "method", "route"]
)


class RejectionReason(StrEnum):
    """Why an uploaded LoRA update was refused: the `reason` label of UPDATES_REJECTED."""

    TOO_LARGE = "too_large"  # over TESSERA_MAX_UPLOAD_BYTES
    BAD_FORMAT = "bad_format"  # not a parseable safetensors file, or its header is wrong
    UNKNOWN_KEYS = "unknown_keys"  # keys that are not LoRA factors of the target modules
    WRONG_SHAPE = "wrong_shape"  # shapes that do not fit the base model, or a wrong rank
    NOT_FINITE = "not_finite"  # NaN or infinite values
    WRONG_BASE_MODEL = "wrong_base_model"  # metadata names another base model
    ROUND_NOT_OPEN = "round_not_open"  # the round is not collecting, or past its deadline
    NOT_ALLOWED = "not_allowed"  # the client may not upload to this round


# Seconds: from a fraction of a second (tiny model, CPU) to the task time limit.
_WORK_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Seconds: rounds last minutes to days.
_ROUND_BUCKETS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 3 * 86400)

UPDATES_RECEIVED = Counter(
    "tessera_updates_received_total",
    "LoRA updates accepted and stored (a re-upload that replaces one counts again)",
)
UPDATES_REJECTED = Counter(
    "tessera_updates_rejected_total",
    "LoRA updates refused before anything was stored, by reason",
    ["reason"],
)
for _reason in RejectionReason:
    # Every reason exported from the start (at 0), so that rates and alerts see it.
    UPDATES_REJECTED.labels(reason=_reason.value)

ROUND_DURATION = Histogram(
    "tessera_round_duration_seconds",
    "Federated round duration, from opening to the publication of its adapters",
    buckets=_ROUND_BUCKETS,
)
AGGREGATION_SECONDS = Histogram(
    "tessera_aggregation_seconds",
    "Time to aggregate the updates of one cluster into its adapter (worker)",
    buckets=_WORK_BUCKETS,
)

ADAPTER_CACHE_HITS = Counter(
    "tessera_adapter_cache_hits_total", "Adapter loads served from the inference cache"
)
ADAPTER_CACHE_MISSES = Counter(
    "tessera_adapter_cache_misses_total", "Adapter loads that had to read the object store"
)
ADAPTER_CACHE_EVICTIONS = Counter(
    "tessera_adapter_cache_evictions_total",
    "Adapters dropped from the cache to stay within its size",
)
# Gauges say how a Celery worker's /metrics adds up its pool processes (multiprocess mode).
ADAPTER_CACHE_BYTES = Gauge(
    "tessera_adapter_cache_bytes",
    "Bytes of adapter weights held in the inference cache",
    multiprocess_mode="livesum",
)

GENERATION_QUEUE_DEPTH = Gauge(
    "tessera_generation_queue_depth",
    "Generation jobs waiting in the queue",
    multiprocess_mode="livemostrecent",
)
GENERATION_SECONDS = Histogram(
    "tessera_generation_seconds",
    "Generation latency, from the job's enqueueing to its image being stored",
    buckets=_WORK_BUCKETS,
)
