"""The exporter process: it receives Celery's and taskexec's events on two threads and serves
``/metrics``."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from prometheus_client import CollectorRegistry, start_http_server
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from taskexec.celery_app import (
    EVENTS_ENABLE_INTERVAL,
    QUEUES,
    close_app,
    create_app,
    enable_task_events,
    redis_url,
)
from taskexec.client import Client
from taskexec.metrics.collectors import QueueBacklog, WorkersOnline, priority_lists
from taskexec.metrics.families import (
    DEFAULT_PORT,
    RUN_EVENTS_PATTERN,
    FleetMetrics,
)
from taskexec.metrics.listeners import RunDurations, RunEvents, TaskEvents
from taskexec.settings import Settings

__all__ = ["Exporter", "serve"]

log = logging.getLogger(__name__)


class Exporter:
    """The metrics of one fleet: event threads feeding a registry that ``serve`` exposes.

    Example:
        >>> exporter = Exporter(Settings())  # doctest: +SKIP
        >>> exporter.start(); ...; exporter.stop()  # doctest: +SKIP
    """

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = FleetMetrics(self.registry)
        self.app: Celery = create_app(settings)
        # Run events live on TASKEXEC_REDIS_URL's server, queues on the broker's: the same
        # server unless the operator split them. Two quick retries, not redis-py's default
        # backoff: a scrape while Redis is down answers at once, without queue lengths.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.1), 2)
        self.redis = redis.Redis.from_url(
            redis_url(settings), socket_connect_timeout=5, socket_timeout=10, retry=retry
        )
        self.broker = redis.Redis.from_url(
            redis_url(settings, settings.broker_url), socket_connect_timeout=5, socket_timeout=10, retry=retry
        )
        lock = threading.Lock()
        self.state = self.app.events.State(max_tasks_in_memory=10_000, max_workers_in_memory=1_000)
        self.task_events = TaskEvents(self.metrics, self.state, lock)
        # Without a configured store there is no run duration to read (and the default,
        # embedded mode's SQLite file, is not the fleet's).
        client = Client(settings) if settings.database_url else None
        self.durations = RunDurations(self.metrics, client)
        self.run_events = RunEvents(self.metrics, self.durations)
        options = self.app.conf.broker_transport_options or {}
        lists = {q: priority_lists(q, options) for q in QUEUES}
        self.registry.register(QueueBacklog(self.broker, lists))
        self.registry.register(WorkersOnline(self.state, lock))
        self._stop = threading.Event()
        self._receiver: Any = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start receiving Celery events and run events (daemon threads).

        Workers send task events only when asked: the exporter asks the workers up now
        (waiting a second for their answers, so that the tasks they start next are
        counted), then every few seconds for the ones that start later.
        """
        with contextlib.suppress(Exception):  # no broker now: the loop asks again later
            enable_task_events(self.app, wait=1.0)
        for target, name in (
            (self._receive_celery_events, "taskexec-metrics-celery"),
            (self._receive_run_events, "taskexec-metrics-runs"),
            (self._enable_events, "taskexec-metrics-enable-events"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads and close every connection the exporter opened."""
        self._stop.set()
        receiver = self._receiver
        if receiver is not None:
            receiver.should_stop = True
        for thread in self._threads:
            thread.join(timeout)
        self.durations.close()
        self.redis.close()
        self.broker.close()
        close_app(self.app)

    def _backoff(self, delay: float) -> float:
        self._stop.wait(delay)
        return min(delay * 2, 30.0)

    def _receive_celery_events(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    receiver = self.app.events.Receiver(conn, handlers={"*": self._on_celery_event})
                    # Published before the check: stop() sets the flag, then reads this.
                    self._receiver = receiver
                    if self._stop.is_set():
                        return
                    delay = 1.0
                    # wakeup: workers answer with a heartbeat at once, so the worker count is right.
                    receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception as e:  # the broker went away: reconnect with backoff, like Flower
                if self._stop.is_set():
                    return
                log.warning("Celery events: %s; reconnecting in %.0f s", e, delay)
                delay = self._backoff(delay)

    def _enable_events(self) -> None:
        while not self._stop.wait(EVENTS_ENABLE_INTERVAL):
            try:
                enable_task_events(self.app)
            except Exception as e:  # the broker is away; the receiver reconnects too
                log.warning("enable_events broadcast: %s", e)

    def _on_celery_event(self, event: dict[str, Any]) -> None:
        try:
            self.task_events.handle(event)
        except Exception:  # one odd event must not drop the connection
            log.exception("Celery event not accounted: %r", event.get("type"))

    def _receive_run_events(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(RUN_EVENTS_PATTERN)
                delay = 1.0
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        self._on_run_event(message["data"])
            except redis.RedisError as e:
                log.warning("run events: %s; reconnecting in %.0f s", e, delay)
                delay = self._backoff(delay)
            finally:
                pubsub.close()

    def _on_run_event(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
            if isinstance(event, dict):
                self.run_events.handle(event)
        except Exception:
            log.exception("run event not accounted: %r", data)


def serve(
    exporter: Exporter,
    port: int = DEFAULT_PORT,
    address: str = "127.0.0.1",
    *,
    stop: threading.Event,
    ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve ``/metrics`` and feed it until ``stop`` is set; then stop everything.

    ``ready(address, port)`` is called once the port is bound (``port=0`` picks a free one).
    """
    try:
        server, thread = start_http_server(port, addr=address, registry=exporter.registry)
    except BaseException:
        exporter.stop()
        raise
    try:
        exporter.start()
        if ready is not None:
            ready(address, int(server.server_port))
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        exporter.stop()
