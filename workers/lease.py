"""A running attempt's hold on its task: the lease heartbeat and the cancellation check.

A worker claims a task's row with a lease (``TASKEXEC_LEASE_SECONDS``); until the attempt's
outcome is stored, :class:`Heartbeat` renews it every third of the lease, with the run's
concurrency slot. The lease lives in two places: ``lease_until`` in the store, and a key in
Redis (:func:`alive_key`). A task is taken over only when both have run out, so a worker
waiting out a database outage with a finished outcome in hand (its store lease lapses, its
Redis key does not) is never doubled by a second execution. A worker that dies or freezes
stops renewing both: after the lease another delivery takes the task over, and the old
attempt, if it ever wakes, finds its claim lost (:class:`CancelCheck` turns true) and its
writes refused.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import timedelta

from redis import Redis, RedisError

from taskexec.errors import DatabaseUnavailableError
from taskexec.run import events
from taskexec.run.liveness import hold
from taskexec.run.ratelimit import Slots
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.store.tables import utcnow

__all__ = ["CancelCheck", "Heartbeat"]

log = logging.getLogger("taskexec.worker")


class CancelCheck:
    """``ctx.is_cancelled``: the run was cancelled (Redis flag, asked at most twice a second),
    or this attempt lost its claim (the heartbeat found the task taken over)."""

    def __init__(self, redis: Redis | None, run_id: str) -> None:
        self.redis, self.key = redis, events.cancel_key(run_id)
        self.checked, self.value = 0.0, False
        self.lost = threading.Event()

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.value and self.redis is not None and now - self.checked >= 0.5:
            self.checked = now
            with contextlib.suppress(RedisError):
                self.value = bool(self.redis.exists(self.key))
        return self.value or self.lost.is_set()


class Heartbeat(threading.Thread):
    """Renews a running attempt's lease (and its concurrency slot) every third of the lease."""

    def __init__(
        self,
        store: Store,
        slots: Slots | None,
        redis: Redis | None,
        *,
        run_id: str,
        task_id: str,
        attempt: int,
        slot: str | None,
        lease: float,
        lost: threading.Event,
    ) -> None:
        super().__init__(name=f"heartbeat {run_id}/{task_id}", daemon=True)
        self.store, self.slots, self.redis = store, slots, redis
        self.run_id, self.task_id, self.attempt, self.slot = run_id, task_id, attempt, slot
        self.lease, self.lost = lease, lost
        self.done = threading.Event()
        self._finishing = False

    def run(self) -> None:
        interval = self.lease / 3
        while not self.done.wait(interval):
            # Redis first: it is what keeps a takeover off while the store is unreachable.
            hold(self.redis, self.run_id, self.task_id, self.attempt, self.lease)
            if self._finishing:
                continue  # the outcome's own write ends the store's lease: keep only Redis's
            try:
                if self.slots is not None and self.slot is not None:
                    self.slots.renew(self.slot, holder=self.task_id, lease=self.lease)
                # One quick try: a store outage must not stall the Redis renewals above.
                with self.store.begin(wait=0) as s:
                    until = utcnow() + timedelta(seconds=self.lease)
                    held = repo.renew_lease(s, self.run_id, self.task_id, self.attempt, until)
            except (DatabaseUnavailableError, RedisError) as e:
                log.warning("lease of %s/%s not renewed: %s", self.run_id, self.task_id, e)
                interval = min(self.lease / 3, 1.0)  # renew soon after the store is back
                continue
            interval = self.lease / 3
            if not held:
                log.warning("%s/%s attempt %s lost its claim", self.run_id, self.task_id, self.attempt)
                self.lost.set()
                return

    def finishing(self) -> None:
        """The handler returned: from now on only the Redis lease is renewed.

        The outcome's write ends the store's lease itself (the row leaves ``running``); a
        renewal racing it would read that as a lost claim. While that write waits for an
        unreachable store, the Redis lease alone keeps a takeover off.
        """
        self._finishing = True

    def stop(self) -> None:
        """End the renewals: the attempt's outcome is stored. The Redis lease runs out by
        itself (it only counts while the row is ``running``, which it no longer is)."""
        self.done.set()
