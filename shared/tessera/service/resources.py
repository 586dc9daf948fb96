"""Connections a service holds: opened lazily on first use, closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis
import redis.asyncio as aioredis
from celery import Celery
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tessera import db
from tessera.config import Settings
from tessera.queue import QUICK_SOCKET_TIMEOUT_S, make_celery
from tessera.storage import ObjectStore

REDIS_TIMEOUT_S = 2
SPARE_CONNECTIONS = 4


@dataclass
class Resources:
    """The database, Redis, object store and Celery handles of one process. `quick`: a
    process that answers requests (a hung backend costs a few seconds, then a 503)."""

    settings: Settings
    quick: bool = False

    @cached_property
    def engine(self) -> Engine:
        """A connection for each request in flight, and a few for what runs beside them
        (the housekeeping loop, readiness probes); a request process gives up on a database that
        does not answer within db.QUICK_DATABASE_TIMEOUT_S."""
        connections = self.settings.max_requests_in_flight + SPARE_CONNECTIONS
        return db.create_db_engine(
            self.settings.resolved_database_url,
            connections=connections,
            timeout_s=db.QUICK_DATABASE_TIMEOUT_S if self.quick else None,
        )

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return db.session_factory(self.engine)

    def _redis_options(self) -> dict[str, Any]:
        """Timeouts, and for a quick process one immediate retry (a Redis that restarted: the
        pooled connection is dead, a new one works) instead of redis-py's three with backoff,
        which made a hung Redis cost 15 s."""
        if not self.settings.redis_url:
            raise ValueError("TESSERA_REDIS_URL is not set (`tessera up` starts an embedded one)")
        timeout = QUICK_SOCKET_TIMEOUT_S if self.quick else REDIS_TIMEOUT_S
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": 10,
        }
        if self.quick:
            options["retry"] = Retry(NoBackoff(), 1)
        return options

    @cached_property
    def redis(self) -> redis.Redis:
        options = self._redis_options()
        return redis.Redis.from_url(self.settings.redis_url or "", **options)

    @cached_property
    def async_redis(self) -> aioredis.Redis:
        """Redis for the event loop (server-sent events); bound to the loop that first uses it."""
        options = self._redis_options()
        if self.quick:
            options["retry"] = AsyncRetry(NoBackoff(), 1)
        return aioredis.Redis.from_url(self.settings.redis_url or "", **options)

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore.from_settings(self.settings, quick=self.quick)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings, quick=self.quick)

    def opened(self, name: str) -> bool:
        """Whether the handle `name` was created (a cached_property lives in __dict__)."""
        return name in self.__dict__

    def close(self) -> None:
        if self.opened("engine"):
            self.engine.dispose()
        if self.opened("redis"):
            self.redis.close()
        if self.opened("celery"):
            self.celery.close()

    async def aclose(self) -> None:
        """Close the event loop's handles, then the others."""
        if self.opened("async_redis"):
            await self.async_redis.aclose()
        self.close()
