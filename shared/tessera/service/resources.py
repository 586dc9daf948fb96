"""Connections a service holds: opened lazily on first use, closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import redis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tessera import db
from tessera.config import Settings
from tessera.queue import make_celery
from tessera.storage import ObjectStore


@dataclass
class Resources:
    """The database, Redis, object store and Celery handles of one process."""

    settings: Settings
    _opened: set[str] = field(default_factory=set)

    @cached_property
    def engine(self) -> Engine:
        self._opened.add("engine")
        return db.create_db_engine(self.settings.resolved_database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return db.session_factory(self.engine)

    @cached_property
    def redis(self) -> redis.Redis:
        if not self.settings.redis_url:
            raise ValueError("TESSERA_REDIS_URL is not set (`tessera up` starts an embedded one)")
        self._opened.add("redis")
        return redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=2,
            socket_connect_timeout=2,
            health_check_interval=10,
        )

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore.from_settings(self.settings)

    @cached_property
    def celery(self) -> Celery:
        self._opened.add("celery")
        return make_celery(self.settings)

    def close(self) -> None:
        if "engine" in self._opened:
            self.engine.dispose()
        if "redis" in self._opened:
            self.redis.close()
        if "celery" in self._opened:
            self.celery.close()
