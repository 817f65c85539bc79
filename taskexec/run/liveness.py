"""A running attempt's lease in Redis: the second half of a worker's hold on its task.

The store's ``lease_until`` says a task is held; the worker's heartbeat renews it. When the
store itself is unreachable, that lease runs out while the worker is alive and holds a
finished outcome it cannot yet write. So the heartbeat also keeps a key in Redis
(:func:`alive_key`, renewed first, whatever the store does), and a task is taken over only
when both leases have run out (:func:`alive` is false). A worker that died or froze
renews neither.
"""

from __future__ import annotations

import contextlib

from redis import Redis, RedisError

__all__ = ["alive", "alive_key", "hold"]


def alive_key(run_id: str, task_id: str) -> str:
    """The Redis key that says which attempt of a task a live worker holds."""
    return f"taskexec:alive:{run_id}/{task_id}"


def hold(redis: Redis | None, run_id: str, task_id: str, attempt: int, lease: float) -> None:
    """Mark ``attempt`` as held by a live worker for ``lease`` seconds (renewed by the heartbeat)."""
    if redis is not None:
        with contextlib.suppress(RedisError):
            redis.set(alive_key(run_id, task_id), attempt, px=max(1, int(lease * 1000)))


def alive(redis: Redis | None, run_id: str, task_id: str, attempt: int) -> bool:
    """Whether a live worker still holds ``attempt`` (its Redis lease has not run out).

    Unknown (Redis unreachable) counts as held: a takeover waits rather than risk a second
    execution; it happens once Redis answers again.
    """
    if redis is None:
        return False
    try:
        held = redis.get(alive_key(run_id, task_id))
    except RedisError:
        return True
    return held is not None and int(held) == attempt
