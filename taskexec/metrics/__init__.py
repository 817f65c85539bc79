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
taskexec_edge_latency_seconds                       ``execution: dag`` runs: a task's last
                                                    upstream task ended → the task
                                                    started (the store's times, at the end)
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

from taskexec.metrics.collectors import QueueBacklog, WorkersOnline, priority_lists
from taskexec.metrics.exporter import Exporter, serve
from taskexec.metrics.families import DEFAULT_PORT, RUN_EVENTS_PATTERN, FleetMetrics
from taskexec.metrics.listeners import RunDurations, RunEvents, TaskEvents

__all__ = [
    "DEFAULT_PORT",
    "RUN_EVENTS_PATTERN",
    "Exporter",
    "FleetMetrics",
    "QueueBacklog",
    "RunDurations",
    "RunEvents",
    "TaskEvents",
    "WorkersOnline",
    "priority_lists",
    "serve",
]
