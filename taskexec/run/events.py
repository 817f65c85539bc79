"""Run events: every state change, once persisted, is published on ``taskexec:run:<id>``.

Events are a live view, not the record: PostgreSQL holds the truth, and a subscriber
that misses events (Redis restarted, slow consumer) reads the store instead. Publishing
never fails the caller.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from redis import Redis, RedisError

from taskexec.models import Change

__all__ = ["cancel_key", "channel", "publish", "subscribe"]

log = logging.getLogger(__name__)


def channel(run_id: str) -> str:
    """The pub/sub channel of a run's events."""
    return f"taskexec:run:{run_id}"


def cancel_key(run_id: str) -> str:
    """The Redis key that tells running handlers their run was cancelled (fast path)."""
    return f"taskexec:cancel:{run_id}"


def publish(redis: Redis | None, changes: Iterable[Change]) -> None:
    """Publish changes as JSON events on their runs' channels; errors are logged, not raised."""
    if redis is None:
        return
    try:
        pipe = redis.pipeline(transaction=False)
        at = time.time()  # published right after the commit that made the change
        n = 0
        for c in changes:
            event = {
                "run_id": c.run_id,
                "task_id": c.task_id,
                "status": c.status,
                "attempt": c.attempt,
                "error_code": c.error_code,
                "message": c.message,
                "at": at,
                **(c.data or {}),
            }
            pipe.publish(channel(c.run_id), json.dumps(event))
            n += 1
        if n:
            pipe.execute()
    except RedisError as e:
        log.warning("run events not published: %s", e)


def subscribe(redis: Redis, run_id: str, timeout: float = 1.0) -> Iterator[dict[str, Any] | None]:
    """Yield a run's events as they come; ``None`` every ``timeout`` seconds without one."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(run_id))
    try:
        while True:
            msg = pubsub.get_message(timeout=timeout)
            if msg is None:
                yield None
            elif msg.get("type") == "message":
                yield json.loads(msg["data"])
    finally:
        pubsub.close()
