"""What the exporter does with each event it receives: Celery task events, run events, and
a run's duration read from the store when it ends."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from taskexec.celery_app import (
    QUEUES,
    TASK_NAMES,
)
from taskexec.client import Client
from taskexec.metrics.edges import edge_latencies
from taskexec.metrics.families import (
    CELERY_STATES,
    THROTTLED,
    FleetMetrics,
)
from taskexec.models import RunStatus, TaskStatus
from taskexec.store.manifests import compiled_run

__all__ = ["RunDurations", "RunEvents", "TaskEvents"]

log = logging.getLogger(__name__)


def _task_label(name: str | None) -> str:
    # Label values stay a closed set: a stray task name must not grow the series.
    if name is None:
        return "unknown"
    return name if name in TASK_NAMES else "other"


class TaskEvents:
    """Celery task events -> metrics; the :class:`State` merges events of one task."""

    #: Started tasks whose ``task-sent`` has not arrived yet, kept at most this many.
    MAX_UNSENT = 10_000
    #: A wait below zero by less than this is the two events' order on one host (Celery
    #: sends ``task-sent`` after the message, a worker may start first): counted as 0.
    #: Further below, the publisher's and the worker's clocks differ: not counted.
    SKEW = 1.0

    def __init__(self, metrics: FleetMetrics, state: Any, lock: threading.Lock) -> None:
        self.metrics = metrics
        self.state = state  # celery.events.state.State (untyped)
        self.lock = lock
        # uuid -> started timestamp: the events of one task come over separate connections
        # (publisher, worker), so ``task-started`` may be received first.
        self._unsent: dict[str, float] = {}

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
        elif kind == "started" and task is not None and not task.eta and not task.retries:
            started = float(event.get("timestamp") or 0)
            if task.sent:
                self._observe_wait(started - float(task.sent), labels)
            else:
                with self.lock:
                    if len(self._unsent) >= self.MAX_UNSENT:
                        self._unsent.pop(next(iter(self._unsent)))
                    self._unsent[str(event.get("uuid"))] = started
        elif kind == "sent":
            with self.lock:
                early = self._unsent.pop(str(event.get("uuid")), None)
            if early is not None:  # labelled by this event: the started one has no name
                self._observe_wait(early - float(event.get("timestamp") or 0), labels)

    def _observe_wait(self, wait: float, labels: dict[str, str]) -> None:
        if wait > -self.SKEW:
            self.metrics.wait.labels(**labels).observe(max(wait, 0.0))


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
        if task_status.active:
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
            result = self.client.status(run_id)
            duration = result.statistics.duration_seconds
            with self.client.store.begin() as s:
                manifest = compiled_run(s, run_id).manifest
            if manifest.execution == "dag":  # its stage gap's counterpart, from the store's times
                for seconds in edge_latencies(manifest, result.tasks):
                    self.metrics.edge_latency.observe(max(seconds, 0.0))
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
