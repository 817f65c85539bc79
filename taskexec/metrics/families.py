"""The metric families the exporter serves, their buckets, and the names shared by its sources."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["CELERY_STATES", "DEFAULT_PORT", "RUN_EVENTS_PATTERN", "THROTTLED", "FleetMetrics"]


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
        self.edge_latency = Histogram(
            "taskexec_edge_latency_seconds",
            "execution: dag runs: a task's last upstream task ended -> the task started (the store's).",
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
