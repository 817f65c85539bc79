"""A worker process's runtime: its services (settings, app, store, Redis), created after fork.

Celery's prefork pool forks after the parent may have opened connections: each pool
process builds its own on first use (:func:`workers.tasks.runtime`), and drops any the
parent left (``worker_process_init``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from celery import Celery
from redis import Redis

from taskexec.celery_app import redis_url
from taskexec.run.ratelimit import RateLimiter, Slots
from taskexec.services import Services
from taskexec.settings import Settings
from taskexec.store import Store
from workers.handlers import load_modules

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """Per-process state of a worker: its services and its name in the store."""

    services: Services
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _limiter: RateLimiter | None = field(default=None, repr=False)
    _slots: Slots | None = field(default=None, repr=False)

    @classmethod
    def create(cls, settings: Settings, app: Celery) -> Runtime:
        """A runtime for ``settings``: a store engine that rides out outages, a Redis client,
        the operator's handler modules imported."""
        url = redis_url(settings)
        redis = Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5) if url else None
        load_modules(settings)
        return cls(Services(settings, app, Store.from_settings(settings, retry=True), redis))

    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def store(self) -> Store:
        return self.services.store

    @property
    def redis(self) -> Redis | None:
        return self.services.redis

    @property
    def limiter(self) -> RateLimiter:
        """Token buckets on this worker's Redis."""
        assert self.redis is not None, "rate limits need Redis"
        if self._limiter is None:
            self._limiter = RateLimiter(self.redis)
        return self._limiter

    @property
    def slots(self) -> Slots:
        """Concurrency slots on this worker's Redis."""
        assert self.redis is not None, "concurrency caps need Redis"
        if self._slots is None:
            self._slots = Slots(self.redis)
        return self._slots
