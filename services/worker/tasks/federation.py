"""Federation task: aggregate a closed round, or flush a buffered round's full buffers.

Deadlines, quorum and stuck rounds belong to the aggregator's round loop
(`services.aggregator.rounds_loop`), not to a task. The task inherits the app's time limits
(from TESSERA_TASK_TIME_LIMIT_S) and late acknowledgement; the work itself is in
`services.worker.rounds`, as plain functions.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from celery import Task, shared_task
from celery.signals import worker_process_init

from services.worker import context
from services.worker.buffered import aggregate_or_flush
from services.worker.rounds import TRANSIENT_ERRORS, mark_round_failed
from tessera.events import TASK_AGGREGATE_ROUND
from tessera.lora import LoraSpec
from tessera.lora.bounds import ScaleRange
from tessera.model.facts import load_facts, resolve_targets

log = logging.getLogger(__name__)


@functools.cache
def lora_spec_of(model: str, targets: str) -> LoraSpec:
    """The base model's LoRA spec from its facts (no weights loaded), once per process."""
    return load_facts(model).lora_spec(resolve_targets(targets, model))


MAX_RETRIES = 3
RETRY_BACKOFF_S = 10  # doubled at each retry: 10, 20, 40 s


@worker_process_init.connect
def _one_torch_thread(**_kwargs: Any) -> None:
    # Each pool process is one unit of parallelism (TESSERA_WORKER_CONCURRENCY). Intra-op
    # threads on top oversubscribe the cores, and MKL's threaded SVD, which aggregation runs
    # per module, slows down a hundredfold when its other thread's core is busy.
    torch.set_num_threads(1)


@shared_task(bind=True, name=TASK_AGGREGATE_ROUND, max_retries=MAX_RETRIES)
def aggregate_round(self: Task, round_id: int) -> dict[str, Any]:
    """Aggregate a round in state aggregating and publish its adapters, or flush a buffered
    round's full buffers (safe to run again).

    Connection errors (Redis, database, object store) are retried with backoff; after the last
    retry, or on any other error, the round is marked failed and the error propagates.
    """
    resources = context.resources()
    try:
        return aggregate_or_flush(
            round_id,
            sessions=resources.sessions,
            store=resources.store,
            redis=resources.redis,
            scales=ScaleRange(resources.settings.min_lora_scale, resources.settings.max_lora_scale),
            stale_s=resources.settings.task_stale_s,
            spec=lora_spec_of(resources.settings.base_model, resources.settings.lora_targets),
        )
    except TRANSIENT_ERRORS as error:
        retries = self.request.retries
        if retries < MAX_RETRIES:
            raise self.retry(exc=error, countdown=RETRY_BACKOFF_S * 2**retries) from error
        try:
            mark_round_failed(
                resources.sessions,
                round_id,
                f"gave up after {retries} retries: {type(error).__name__}: {error}",
            )
        except Exception:
            log.exception("could not mark the round failed", extra={"round_id": round_id})
        raise
