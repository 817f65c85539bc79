"""Run events for the dashboard's open pages: one Redis subscription per server process.

A thread holds one pattern subscription to every run's channel (``taskexec:run:*``, see
:mod:`taskexec.run.events`) and hands each event to the pages following that run (or
every run: the runs list). Fifty open pages cost one subscription, not fifty. Events only
wake a page, which then reads the store: a missed event costs a later refresh, nothing
more. Without Redis (an embedded run that has ended) nothing arrives and pages show what
the store holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import Any

from redis import Redis, RedisError

from taskexec.run.events import channel

__all__ = ["ALL", "EventHub"]

log = logging.getLogger(__name__)

#: Subscribe to every run's events.
ALL = "*"
#: Events a slow page may have waiting; the oldest are dropped (the page reads the store anyway).
QUEUE_SIZE = 100


class EventHub:
    """Fans one Redis pattern subscription out to asyncio queues, one per open page."""

    def __init__(self, redis: Redis | None) -> None:
        self._redis = redis
        self._subscribers: dict[
            str, set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]]
        ] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: Pattern subscriptions made to Redis (one per started hub; tests count them).
        self.subscriptions = 0

    @property
    def live(self) -> bool:
        """Whether events can arrive at all."""
        return self._redis is not None

    def _start(self) -> None:
        if self._thread is None and self._redis is not None:
            self._thread = threading.Thread(target=self._listen, name="taskexec-ui-events", daemon=True)
            self._thread.start()

    def _listen(self) -> None:
        assert self._redis is not None
        while not self._stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(channel("*"))
                self.subscriptions += 1
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is not None and msg.get("type") == "pmessage":
                        self._deliver(json.loads(msg["data"]))
            except (RedisError, OSError, ValueError) as e:
                log.warning("dashboard event subscription lost, retrying: %s", e)
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    pubsub.close()

    def _deliver(self, event: dict[str, Any]) -> None:
        with self._lock:
            targets = list(self._subscribers.get(str(event.get("run_id")), ())) + list(
                self._subscribers.get(ALL, ())
            )
        for loop, queue in targets:
            with contextlib.suppress(RuntimeError):  # the page's loop has closed
                loop.call_soon_threadsafe(_put, queue, event)

    def subscribe(self, run_id: str) -> asyncio.Queue[dict[str, Any]]:
        """A queue receiving a run's events (``ALL``: every run's) in the calling event loop,
        until :meth:`unsubscribe`."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        with self._lock:
            self._subscribers.setdefault(run_id, set()).add((asyncio.get_running_loop(), queue))
            self._start()
        return queue

    def unsubscribe(self, run_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop delivering to ``queue``."""
        with self._lock:
            entries = self._subscribers.get(run_id, set())
            for entry in [e for e in entries if e[1] is queue]:
                entries.discard(entry)

    def close(self) -> None:
        """Stop the subscription thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _put(queue: asyncio.Queue[dict[str, Any]], event: dict[str, Any]) -> None:
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(event)
