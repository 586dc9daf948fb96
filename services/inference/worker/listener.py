"""A background thread that hands every "adapter published" event to the adapter cache.

Subscribes to `adapter_published_channel` on its own connection; after a (re)connection it
resyncs the cache from the database, since events sent while it was away are lost.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis

from services.inference.worker.cache import AdapterCache
from tessera.events import adapter_published_channel

log = logging.getLogger(__name__)

POLL_S = 1.0
RECONNECT_S = 2.0


class AdapterEventListener:
    """Runs `cache.refresh(event)` for each published adapter until `stop()`."""

    def __init__(self, *, redis_url: str, cache: AdapterCache) -> None:
        self.redis_url = redis_url
        self.cache = cache
        self.subscribed = threading.Event()
        self.events_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-events", daemon=True)

    def start(self) -> AdapterEventListener:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(adapter_published_channel(client))
                self.subscribed.set()
                self._safely(self.cache.resync)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=POLL_S)
                    if message is not None and message.get("type") == "message":
                        self._handle(message["data"])
            except redis.RedisError as error:
                self.subscribed.clear()
                log.warning("adapter events: Redis connection lost", extra={"error": str(error)})
                self._stop.wait(RECONNECT_S)
            finally:
                pubsub.close()
                client.close()

    def _handle(self, data: Any) -> None:
        try:
            event = json.loads(data)
        except (ValueError, TypeError):
            event = None
        if not isinstance(event, dict) or not {"adapter", "version_id"} <= set(event):
            log.warning("adapter events: ignoring a malformed message")
            return
        self.events_seen += 1
        self._safely(lambda: self.cache.refresh(event))

    @staticmethod
    def _safely(action: Any) -> None:
        try:
            action()
        except Exception:
            # A bad version must not stop the listener: the job that needs it reports the error.
            log.exception("adapter events: cache refresh failed")
