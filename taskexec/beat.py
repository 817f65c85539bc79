"""``taskexec beat``: Celery beat whose schedule lives in the result store, one beat at a time.

Celery's default scheduler keeps its state in a local shelve file: a beat started on
another host starts from nothing, and two beats fire everything twice. Here:

* the schedules are rows of the ``schedules`` table, re-read every
  ``beat_refresh_seconds``, so ``taskexec schedule add/remove`` apply to a running beat;
* the time of each schedule's last firing is written to its row before the firing is
  sent, so a beat that starts (or takes over) goes on where the last one stopped;
* a Redis lock, renewed at every tick, lets one beat fire; any other ``taskexec beat``
  waits in standby and takes over within ``beat_lock_seconds`` of the active one's death
  (at once when it stops cleanly and releases the lock). The lock is renewed before each
  tick sends anything, and a tick sends at most one message, so a beat that lost its
  lock (paused past the lock's lifetime) finds out before it sends again.

The reconciler's round (``taskexec.reconcile``) is on beat's schedule too, every
``reconcile_interval``.

Example:
    ``celery -A taskexec.celery_app beat -S taskexec.beat:DatabaseScheduler``, which is
    what ``taskexec beat`` runs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery
from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import schedule as interval
from celery.utils.time import maybe_make_aware
from redis.exceptions import LockError
from sqlalchemy.exc import SQLAlchemyError

from taskexec.celery_app import CONTROL, redis_url
from taskexec.errors import ServiceUnavailableError, TaskexecError
from taskexec.schedules import cron
from taskexec.settings import Settings
from taskexec.store import Store, database_url
from taskexec.store.repository import schedules as rows

__all__ = ["FIRE", "FIRE_EXPIRES", "LOCK", "DatabaseScheduler"]

log = logging.getLogger("taskexec.beat")

#: The Redis lock that lets one beat fire; its value names the holder (host:pid:nonce).
LOCK = "taskexec:beat:lock"
#: The task each firing sends.
FIRE = "taskexec.fire_schedule"
#: Seconds a firing may wait for a worker: a fleet back from an outage does not work off
#: a backlog of stale firings.
FIRE_EXPIRES = 600
_PREFIX = "schedule:"
_RECONCILE = "taskexec.reconcile"


def _utc(value: datetime) -> datetime:
    return maybe_make_aware(value).astimezone(UTC)  # type: ignore[no-any-return]


class DatabaseScheduler(Scheduler):  # type: ignore[misc]
    """A Celery beat scheduler reading the ``schedules`` table, active only while it holds :data:`LOCK`."""

    def __init__(self, app: Celery, *args: Any, **kwargs: Any) -> None:
        self.settings: Settings = app.conf.taskexec_settings
        self.node = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._store: Store | None = None
        self._redis: redis.Redis | None = None
        self._lock: Any = None
        self._active = False
        self._holder: str | None = None
        self._next_refresh = 0.0
        super().__init__(app, *args, **kwargs)
        # Beat sleeps at most this long: the lock must be renewed well within its lifetime.
        cap = min(self.settings.beat_lock_seconds / 3, self.settings.beat_refresh_seconds)
        self.max_interval: float = min(float(self.max_interval), cap)

    # -- connections -------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The result store (its engine retries a connect for up to a few seconds)."""
        if self._store is None:
            self._store = Store(database_url(self.settings), retry_seconds=5.0)
        return self._store

    @property
    def redis(self) -> redis.Redis:
        """Redis for the lock."""
        if self._redis is None:
            url = redis_url(self.settings)
            self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return self._redis

    # -- Celery's Scheduler interface ----------------------------------------------------

    def setup_schedule(self) -> None:
        """Start empty: the schedules are read once this beat holds the lock."""
        self.data: dict[str, ScheduleEntry] = {}

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Renew (or try to take) the lock; when held, refresh the schedules and send what is due."""
        if not self._hold():
            return float(self.max_interval)
        if time.monotonic() >= self._next_refresh:
            self._refresh()
        return float(super().tick(*args, **kwargs))

    def reserve(self, entry: ScheduleEntry) -> ScheduleEntry:
        """Advance an entry and store its new last-run time before its message is sent."""
        new: ScheduleEntry = super().reserve(entry)
        if new.name.startswith(_PREFIX):
            sid = new.name.removeprefix(_PREFIX)
            try:
                due = _utc(new.last_run_at)
                with self.store.begin() as s:
                    rows.set_last_run(s, sid, due)
            except (TaskexecError, SQLAlchemyError) as e:
                # The firing is still sent: a restart may fire it once more, never lose it.
                log.warning("beat: last run of schedule %s not stored: %s", sid, e)
        return new

    def apply_async(
        self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        """Send an entry's task; a firing carries its schedule's id and its due time."""
        if entry.task == FIRE:
            if advance:
                entry, advance = self.reserve(entry), False
            due = _utc(self.schedule[entry.name].last_run_at)
            entry = copy.copy(entry)
            entry.args = (entry.name.removeprefix(_PREFIX), due.isoformat())
        return super().apply_async(entry, producer=producer, advance=advance, **kwargs)

    def sync(self) -> None:
        """Nothing to do: each firing's time is stored when it is reserved."""

    def close(self) -> None:
        """Release the lock (a standby beat takes over at once) and the connections."""
        try:
            super().close()
        finally:
            if self._active and self._lock is not None:
                with contextlib.suppress(LockError, redis.RedisError):
                    self._lock.release()
                log.info("beat: %s released %s", self.node, LOCK)
            self._active = False
            if self._redis is not None:
                self._redis.close()
                self._redis = None
            if self._store is not None:
                self._store.close()
                self._store = None

    @property
    def info(self) -> str:
        """Shown in beat's banner."""
        try:
            where = self.store.engine.url.render_as_string()
        except TaskexecError as e:
            where = str(e)
        return (
            f"    . schedules -> {where}\n"
            f"    . lock -> {LOCK} (renewed each tick, lasts {self.settings.beat_lock_seconds:g}s)"
        )

    # -- the lock and the table ----------------------------------------------------------

    def _hold(self) -> bool:
        """Whether this beat holds the lock now, renewing or taking it."""
        if self._lock is None:
            self._lock = self.redis.lock(LOCK, timeout=self.settings.beat_lock_seconds, thread_local=False)
        try:
            if self._active:
                self._lock.reacquire()
                return True
            if self._lock.acquire(blocking=False, token=self.node):
                self._active = True
                log.info("beat: %s is active (holds %s)", self.node, LOCK)
                # Start from the store: the previous beat's firings are there.
                self.data, self._heap, self._next_refresh = {}, None, 0.0
                return True
        except LockError:
            self._active = False
            log.warning("beat: %s lost %s; standing by", self.node, LOCK)
            return False
        except redis.RedisError as e:
            # Without Redis there is no broker to send to either: wait, keep the claim.
            log.warning("beat: cannot reach Redis: %s", e)
            return False
        holder = self._current_holder()
        if holder != self._holder:
            self._holder = holder
            log.info("beat: %s stands by; %s is active", self.node, holder or "another beat")
        return False

    def _current_holder(self) -> str | None:
        with contextlib.suppress(redis.RedisError):
            value = self.redis.get(LOCK)
            if isinstance(value, bytes):
                return value.decode()
        return None

    def _refresh(self) -> None:
        """Re-read the enabled schedules; unchanged entries keep their place in the heap."""
        self._next_refresh = time.monotonic() + self.settings.beat_refresh_seconds
        try:
            with self.store.begin() as s:
                enabled = rows.enabled_schedules(s)
        except (ServiceUnavailableError, SQLAlchemyError) as e:
            log.warning("beat: schedules not re-read, keeping %d: %s", len(self.data), e)
            return
        entries: dict[str, ScheduleEntry] = {_RECONCILE: self.data.get(_RECONCILE) or self._reconcile_entry()}
        for sid, cron_expr, every_seconds, last_run_at, created_at in enabled:
            name = _PREFIX + sid
            try:
                trigger = cron(cron_expr) if cron_expr else interval(timedelta(seconds=every_seconds or 0))
            except TaskexecError as e:
                log.error("beat: schedule %s is not valid, not firing it: %s", sid, e)
                continue
            old = self.data.get(name)
            last = last_run_at or created_at
            new = self.Entry(
                name=name,
                task=FIRE,
                schedule=trigger,
                args=(sid,),
                options={"queue": CONTROL, "expires": FIRE_EXPIRES},
                last_run_at=max(last, _utc(old.last_run_at)) if old is not None else last,
                app=self.app,
            )
            entries[name] = old if old is not None and old == new else new
        if set(entries) != set(self.data):
            log.info("beat: %d schedule(s) enabled", len(entries) - 1)
        self.data = entries

    def _reconcile_entry(self) -> ScheduleEntry:
        every = self.settings.reconcile_interval
        return self.Entry(
            name=_RECONCILE,
            task=_RECONCILE,
            schedule=interval(timedelta(seconds=every)),
            options={"queue": CONTROL, "expires": max(every, 1.0)},
            app=self.app,
        )
