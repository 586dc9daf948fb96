"""Connections a service holds: opened lazily on first use, closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis
import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tessera import db
from tessera.config import Settings
from tessera.queue import make_celery
from tessera.storage import ObjectStore

REDIS_TIMEOUT_S = 2


@dataclass
class Resources:
    """The database, Redis, object store and Celery handles of one process."""

    settings: Settings

    @cached_property
    def engine(self) -> Engine:
        return db.create_db_engine(self.settings.resolved_database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return db.session_factory(self.engine)

    @cached_property
    def redis(self) -> redis.Redis:
        if not self.settings.redis_url:
            raise ValueError("TESSERA_REDIS_URL is not set (`tessera up` starts an embedded one)")
        return redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=10,
        )

    @cached_property
    def async_redis(self) -> aioredis.Redis:
        """Redis for the event loop (server-sent events); bound to the loop that first uses it."""
        if not self.settings.redis_url:
            raise ValueError("TESSERA_REDIS_URL is not set (`tessera up` starts an embedded one)")
        return aioredis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=10,
        )

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore.from_settings(self.settings)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings)

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
