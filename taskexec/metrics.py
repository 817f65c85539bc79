"""Prometheus metrics of a fleet, served by ``taskexec metrics --port 9808``.

One exporter process per fleet (like Flower) listens to three sources and serves the
metrics below on ``/metrics``:

- **Celery task events**, which workers send while asked to (the exporter broadcasts
  ``enable_events`` every few seconds, as Flower does) and every publisher sends
  (``task_send_sent_event``): per task name and queue, what Celery
  did (sent, received, started, succeeded, failed, retried, revoked, rejected), runtimes,
  queue waits, retries. Received the way Flower and celery-exporter receive them, with
  :class:`celery.events.EventReceiver` and a :class:`celery.events.state.State`.
- **Run events** (``psubscribe taskexec:run:*``, see :mod:`taskexec.run.events`): taskexec's
  own task statuses, throttled waits, stage gaps, run ends. When a run ends, its
  duration is read from the result store (:meth:`taskexec.client.Client.status`), so a
  run that began before the exporter started is measured right.
- **The broker's lists**, read at scrape time: the backlog of each queue, summed over
  its priority lists (``executor``, ``executor:1`` … ``executor:9``).

======================================  ==========  =====================================
metric                                  labels      meaning
======================================  ==========  =====================================
taskexec_celery_tasks_total             task queue  Celery task events, by ``state``
                                        state
taskexec_task_runtime_seconds           task queue  handler runtime (``task-succeeded``)
taskexec_task_wait_seconds              task queue  sent → started (first attempts only)
taskexec_task_retries_total             task queue  Celery retries (``task-retried``)
taskexec_task_transitions_total         status      taskexec task statuses (run events)
taskexec_throttled_total                            run events with status ``throttled``
taskexec_stage_gap_seconds                          last task of stage k ended → first
                                                    task of stage k + 1 running
taskexec_runs_total                     status      runs entering a status
taskexec_run_duration_seconds           status      duration of ended runs (the store's)
taskexec_queue_length                   queue       messages waiting in the broker
taskexec_workers_online                             workers whose heartbeats arrive
======================================  ==========  =====================================

Timestamps of run events are the exporter's clock when it receives them: pub/sub
delivers in publish order within milliseconds, and the events carry no time of their
own. Redis pub/sub channels are server-wide (not per db): fleets that share one Redis
server under different db numbers see each other's run events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from taskexec.celery_app import (
    EVENTS_ENABLE_INTERVAL,
    QUEUES,
    TASK_NAMES,
    close_app,
    create_app,
    enable_task_events,
    redis_url,
)
from taskexec.client import Client
from taskexec.models import RunStatus, TaskStatus
from taskexec.settings import Settings

__all__ = [
    "DEFAULT_PORT",
    "RUN_EVENTS_PATTERN",
    "Exporter",
    "FleetMetrics",
    "QueueBacklog",
    "RunEvents",
    "TaskEvents",
    "priority_lists",
    "serve",
]

log = logging.getLogger(__name__)

#: Port of ``taskexec metrics`` (celery-exporter's too: run one or the other).
DEFAULT_PORT = 9808

#: The pattern matching every run's event channel (:func:`taskexec.run.events.channel`).
RUN_EVENTS_PATTERN = "taskexec:run:*"

#: Celery event type -> the ``state`` label of ``taskexec_celery_tasks_total``.
CELERY_STATES = {
    "task-sent": "sent",
    "task-received": "received",
    "task-started": "started",
    "task-succeeded": "succeeded",
    "task-failed": "failed",
    "task-retried": "retried",
    "task-revoked": "revoked",
    "task-rejected": "rejected",
}

#: Statuses a run event may carry beyond :class:`TaskStatus`: the rate limiter's waits.
THROTTLED = "throttled"

_ACTIVE = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING, TaskStatus.VALIDATING})

# Buckets: handlers take milliseconds (stub) to the largest task timeout (30 min);
# stage gaps are milliseconds when the fleet is healthy; runs take seconds to a day.
_RUNTIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class FleetMetrics:
    """The metric families the event sources feed, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        task = ("task", "queue")
        self.celery_tasks = Counter(
            "taskexec_celery_tasks",
            "Celery task events by task name, queue and state.",
            (*task, "state"),
            registry=registry,
        )
        self.runtime = Histogram(
            "taskexec_task_runtime_seconds",
            "Runtime of Celery tasks that returned (task-succeeded).",
            task,
            buckets=_RUNTIME_BUCKETS,
            registry=registry,
        )
        self.wait = Histogram(
            "taskexec_task_wait_seconds",
            "Time from publish to start of first attempts (queue wait plus prefetch).",
            task,
            buckets=_RUNTIME_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "taskexec_task_retries", "Celery retries (task-retried events).", task, registry=registry
        )
        self.transitions = Counter(
            "taskexec_task_transitions",
            "taskexec task status changes from run events.",
            ("status",),
            registry=registry,
        )
        self.throttled = Counter(
            "taskexec_throttled", "Waits for a rate limit token (run events 'throttled').", registry=registry
        )
        self.stage_gap = Histogram(
            "taskexec_stage_gap_seconds",
            "Last task of a stage ended -> first task of the next stage running.",
            buckets=_GAP_BUCKETS,
            registry=registry,
        )
        self.runs = Counter(
            "taskexec_runs", "Runs entering a status, from run events.", ("status",), registry=registry
        )
        self.run_duration = Histogram(
            "taskexec_run_duration_seconds",
            "Duration of ended runs, as the result store records it.",
            ("status",),
            buckets=_RUN_BUCKETS,
            registry=registry,
        )


def _task_label(name: str | None) -> str:
    # Label values stay a closed set: a stray task name must not grow the series.
    if name is None:
        return "unknown"
    return name if name in TASK_NAMES else "other"


class TaskEvents:
    """Celery task events -> metrics; the :class:`State` merges events of one task."""

    def __init__(self, metrics: FleetMetrics, state: Any, lock: threading.Lock) -> None:
        self.metrics = metrics
        self.state = state  # celery.events.state.State (untyped)
        self.lock = lock

    def handle(self, event: dict[str, Any]) -> None:
        """Account one event of any type (worker heartbeats only update the state)."""
        with self.lock:
            self.state.event(event)
            kind = CELERY_STATES.get(str(event.get("type")))
            if kind is None:
                return
            task = self.state.tasks.get(event.get("uuid"))
        name = getattr(task, "name", None) or event.get("name")
        routing_key = getattr(task, "routing_key", None) or event.get("routing_key")
        queue = routing_key if routing_key in QUEUES else TASK_NAMES.get(str(name), "unknown")
        labels = {"task": _task_label(name), "queue": queue}
        self.metrics.celery_tasks.labels(state=kind, **labels).inc()
        if kind == "retried":
            self.metrics.retries.labels(**labels).inc()
        elif kind == "succeeded" and event.get("runtime") is not None:
            self.metrics.runtime.labels(**labels).observe(float(event["runtime"]))
        elif kind == "started" and task is not None and task.sent and not task.eta and not task.retries:
            # Clocks of the publisher and the worker differ: drop what skew makes negative.
            wait = float(event.get("timestamp") or 0) - float(task.sent)
            if wait >= 0:
                self.metrics.wait.labels(**labels).observe(wait)


@dataclass
class _Run:
    """What the exporter knows of a run it saw start: its active tasks, an open stage gap."""

    first_seen: float
    active: set[str] = field(default_factory=set)
    idle_since: float | None = None  # when its last active task ended: a stage gap is open


#: Called when a run ends: (run id, final status, seconds the exporter saw it run or None).
RunEnded = Callable[[str, str, float | None], None]


class RunEvents:
    """Run events -> metrics: statuses, throttled waits, stage gaps, run ends.

    A stage's tasks are all queued at once when it is dispatched, so a run's set of
    active tasks empties exactly when a stage ends; the gap closes when a task of the
    next stage starts running. Runs the exporter did not see start (it started later)
    count in every metric but the stage gap.
    """

    def __init__(
        self,
        metrics: FleetMetrics,
        on_run_end: RunEnded | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_runs: int = 10_000,
    ) -> None:
        self.metrics = metrics
        self.on_run_end = on_run_end
        self.clock = clock
        self.max_runs = max_runs
        self.runs: dict[str, _Run] = {}

    def handle(self, event: Mapping[str, Any]) -> None:
        """Account one run event (the JSON object :func:`taskexec.run.events.publish` sends)."""
        run_id, status = str(event.get("run_id")), str(event.get("status"))
        now = self.clock()
        if event.get("task_id") is None:
            self._run_changed(run_id, status, now)
        else:
            self._task_changed(run_id, str(event["task_id"]), status, now)

    def _run_changed(self, run_id: str, status: str, now: float) -> None:
        try:
            run_status = RunStatus(status)
        except ValueError:
            self.metrics.runs.labels(status="other").inc()
            return
        self.metrics.runs.labels(status=run_status.value).inc()
        if not run_status.terminal:
            if run_id not in self.runs:
                if len(self.runs) >= self.max_runs:  # runs whose end was missed: drop the oldest
                    del self.runs[next(iter(self.runs))]
                self.runs[run_id] = _Run(now)
            return
        seen = self.runs.pop(run_id, None)
        if self.on_run_end is not None:
            self.on_run_end(run_id, run_status.value, None if seen is None else now - seen.first_seen)

    def _task_changed(self, run_id: str, task_id: str, status: str, now: float) -> None:
        if status == THROTTLED:
            self.metrics.transitions.labels(status=THROTTLED).inc()
            self.metrics.throttled.inc()
            return
        try:
            task_status = TaskStatus(status)
        except ValueError:
            self.metrics.transitions.labels(status="other").inc()
            return
        self.metrics.transitions.labels(status=task_status.value).inc()
        run = self.runs.get(run_id)
        if run is None:
            return
        if task_status in _ACTIVE:
            if task_status is TaskStatus.RUNNING and run.idle_since is not None:
                self.metrics.stage_gap.observe(now - run.idle_since)
                run.idle_since = None
            run.active.add(task_id)
        elif task_status.terminal and task_id in run.active:
            run.active.discard(task_id)
            if not run.active:
                run.idle_since = now


class RunDurations:
    """Observes the duration of ended runs, read from the store off the event thread.

    The store's figure (``statistics.duration_seconds``) is the run's own, whenever the
    exporter started; without a store, or when it cannot be read, the exporter's own
    observation is used when it has one.
    """

    def __init__(self, metrics: FleetMetrics, client: Client | None) -> None:
        self.metrics = metrics
        self.client = client
        # One thread: a slow store delays these observations, never the event threads
        # (a pub/sub subscriber that falls behind is disconnected by Redis).
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskexec-metrics-store")

    def __call__(self, run_id: str, status: str, observed: float | None) -> None:
        """Observe the duration of a run that just ended."""
        if self.client is None:
            self._observe(status, observed)
        else:
            self.pool.submit(self._read, run_id, status, observed)

    def _read(self, run_id: str, status: str, observed: float | None) -> None:
        assert self.client is not None
        try:
            duration = self.client.status(run_id).statistics.duration_seconds
        except Exception as e:  # the store is down or the run is gone: not fatal here
            log.warning("duration of run %s not read from the store: %s", run_id, e)
            duration = None
        self._observe(status, observed if duration is None else duration)

    def _observe(self, status: str, duration: float | None) -> None:
        if duration is not None:
            self.metrics.run_duration.labels(status=status).observe(duration)

    def close(self) -> None:
        """Finish pending reads and close the store connections."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.client is not None:
            self.client.close()


def priority_lists(queue: str, transport_options: Mapping[str, Any]) -> list[str]:
    """The Redis lists kombu keeps for ``queue``: one per priority step (``executor:4``).

    Mirrors ``kombu.transport.redis.Channel._q_for_pri``: step 0 is the queue's own name.
    """
    sep = str(transport_options.get("sep", "\x06\x16"))
    steps = list(transport_options.get("priority_steps", [0, 3, 6, 9]))
    return [f"{queue}{sep}{step}" if step else queue for step in steps]


class QueueBacklog(Collector):
    """``taskexec_queue_length``: LLEN of each queue's priority lists, summed, at scrape time."""

    def __init__(self, client: redis.Redis, lists: Mapping[str, list[str]]) -> None:
        self.client = client
        self.lists = lists

    def describe(self) -> Iterable[Metric]:
        """The family without samples, so registering does not touch Redis."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """One gauge sample per queue; none when Redis does not answer."""
        family = self._family()
        try:
            pipe = self.client.pipeline(transaction=False)
            for names in self.lists.values():
                for name in names:
                    pipe.llen(name)
            sizes = iter(pipe.execute())
        except redis.RedisError as e:
            log.warning("queue lengths not read: %s", e)
            return [family]
        for queue, names in self.lists.items():
            family.add_metric([queue], sum(int(next(sizes)) for _ in names))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "taskexec_queue_length", "Messages waiting in the broker, by queue.", labels=["queue"]
        )


class WorkersOnline(Collector):
    """``taskexec_workers_online``: workers whose heartbeats the exporter receives."""

    def __init__(self, state: Any, lock: threading.Lock) -> None:
        self.state = state
        self.lock = lock

    def describe(self) -> Iterable[Metric]:
        """The family without samples."""
        return [GaugeMetricFamily("taskexec_workers_online", "Workers sending heartbeats.")]

    def collect(self) -> Iterator[Metric]:
        """The number of workers alive now."""
        with self.lock:
            alive = sum(1 for _ in self.state.alive_workers())
        yield GaugeMetricFamily("taskexec_workers_online", "Workers sending heartbeats.", value=alive)


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
