"""What the run's code works with, in one object: settings, Celery app, store, Redis.

Dispatch, the producer, the reconciler and the end of a run take a :class:`Services`
rather than reaching for the module-level Celery app: a worker, a producer, an embedded
fleet and a test each build their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from redis import Redis

from taskexec.settings import Settings
from taskexec.store import Store

__all__ = ["Services"]


@dataclass
class Services:
    """Settings, the Celery app to publish with, the result store, and Redis (events,
    cancel flags, leases, rate limits; ``None`` where there is none)."""

    settings: Settings
    app: Celery
    store: Store
    redis: Redis | None
