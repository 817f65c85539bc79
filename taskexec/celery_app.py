"""The Celery app: queues, routes, serializer and delivery settings.

``celery -A taskexec.celery_app worker`` and ``celery -A taskexec.celery_app flower`` use
the module-level :data:`app`, configured from the environment; code that holds its own
:class:`~taskexec.settings.Settings` calls :func:`create_app`.

Delivery is at least once: ``acks_late`` with ``reject_on_worker_lost`` re-queues the
message of a task whose worker died, and the Redis ``visibility_timeout`` re-delivers an
unacknowledged message after it. Every task therefore tolerates a second delivery (see
``workers/tasks.py``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import click
from celery import Celery, bootsteps
from kombu.entity import Exchange, Queue

from taskexec.errors import InvalidInputError
from taskexec.settings import Settings

__all__ = [
    "CONTROL",
    "EXECUTOR",
    "QUEUES",
    "TASK_NAMES",
    "VALIDATOR",
    "app",
    "close_app",
    "create_app",
    "redis_url",
    "worker_argv",
]

EXECUTOR, VALIDATOR, CONTROL = "executor", "validator", "control"
QUEUES = (EXECUTOR, VALIDATOR, CONTROL)

#: Celery task name -> queue. Names are readable in Flower and in ``celery inspect``.
TASK_NAMES = {
    "taskexec.execute": EXECUTOR,
    "taskexec.validate": VALIDATOR,
    "taskexec.dispatch": CONTROL,
    "taskexec.advance": CONTROL,
    "taskexec.release": CONTROL,
    "taskexec.stage_failed": CONTROL,
    "taskexec.reconcile": CONTROL,
    "taskexec.notify": CONTROL,
    "taskexec.webhook": CONTROL,
    "taskexec.fire_schedule": CONTROL,
}


class ReconcileTimer(bootsteps.StartStopStep):  # type: ignore[misc]
    """``taskexec worker --reconcile``: send a reconciler round every ``reconcile_interval``.

    Any number of workers may carry the flag: a short Redis lock lets one message per
    interval through, fleet-wide, and the round itself runs behind a second lock.
    """

    requires = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, reconcile: bool = False, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.enabled = bool(reconcile)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        settings: Settings = worker.app.conf.taskexec_settings
        interval = settings.reconcile_interval
        self.tref = worker.timer.call_repeatedly(interval, self._tick, (worker.app, interval), priority=10)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    @staticmethod
    def _tick(app: Celery, interval: float) -> None:
        import redis

        settings: Settings = app.conf.taskexec_settings
        try:
            client = redis.Redis.from_url(redis_url(settings), socket_timeout=5)
            with client:
                if client.set("taskexec:reconcile:tick", "1", nx=True, px=int(interval * 900)):
                    app.send_task("taskexec.reconcile", queue=CONTROL, ignore_result=True)
        except Exception as e:  # the timer must survive a broker outage
            logging.getLogger(__name__).warning("reconciler round not sent: %s", e)


def redis_url(settings: Settings, url: str | None = None) -> str:
    """A redis-py URL for the broker's (or ``url``'s) server; ``redis+socket://`` becomes ``unix://``."""
    url = url or settings.redis_url or settings.broker_url or ""
    if url.startswith("redis+socket://"):
        return "unix://" + url.removeprefix("redis+socket://")
    return url


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``.

    Raises:
        InvalidInputError: The result backend is not Redis: chords on other backends poll with
            ``chord_unlock`` instead of counting parts atomically.
    """
    broker = settings.broker_url or "redis://127.0.0.1:6379/0"
    backend = settings.result_backend or broker
    if not backend.startswith(("redis://", "rediss://", "redis+socket://", "unix://")):
        raise InvalidInputError(
            "the result backend must be Redis (chords need it)", path="TASKEXEC_RESULT_BACKEND"
        )
    if backend.startswith("unix://"):
        backend = "redis+socket://" + backend.removeprefix("unix://")
    transport: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout,
        # kombu sweeps for unacked messages past the visibility timeout every interval x
        # throttle seconds (100 s by default): keep the sweep well inside the timeout.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
        "unacked_restore_throttle": 1 if settings.visibility_timeout < 1000 else 10,
        # Priorities on Redis: one list per step; 0 is the highest priority.
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
        "sep": ":",
    }
    return {
        "broker_url": broker,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        # No task result is kept: the store holds every outcome, and nothing reads Celery's.
        # A chord still counts its parts in the result backend (on_chord_part_return runs
        # whatever ignore_result says) and deletes its keys when its body is sent; the keys
        # of a chord that never completes (a part lost to a fault) expire after a day.
        "task_ignore_result": True,
        "result_expires": 24 * 3600,
        "task_default_queue": CONTROL,
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        "task_routes": {name: {"queue": q, "routing_key": q} for name, q in TASK_NAMES.items()},
        "task_create_missing_queues": False,
        # Task events on demand: Flower and `taskexec metrics` turn them on (the
        # `enable_events` broadcast, repeated every few seconds for workers that start
        # later); a fleet nobody watches does not pay for them (a third of a small task's
        # cost). Worker heartbeats are always sent. Producers send task-sent events.
        "worker_send_task_events": False,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
        "taskexec_settings": settings,
    }


def _new_app() -> Celery:
    app = Celery("taskexec", include=["workers.tasks", "workers.notify", "workers.recurring"])
    app.steps["worker"].add(ReconcileTimer)
    app.user_options["worker"].add(
        click.Option(["--reconcile"], is_flag=True, default=False, help="Send reconciler rounds (taskexec).")
    )
    return app


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: the environment).

    Raises:
        InvalidInputError: The result backend is not Redis.
    """
    app = _new_app()
    app.conf.update(celery_config(settings or Settings()))
    return app


def worker_argv(
    queues: Sequence[str],
    *,
    name: str,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    reconcile: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of a taskexec Celery worker (prefork, so time limits work).

    >>> " ".join(worker_argv(["executor", "control"], name="e@%h")[5:])
    'worker -Q executor,control -P prefork -n e@%h -l INFO --reconcile'
    """
    argv = [sys.executable, "-m", "celery", "-A", "taskexec.celery_app", "worker", "-Q", ",".join(queues)]
    argv += ["-P", "prefork", "-n", name, "-l", loglevel]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if reconcile:
        argv.append("--reconcile")
    return [*argv, *extra]


#: How often Flower-like watchers repeat ``enable_events`` (Flower's own interval).
EVENTS_ENABLE_INTERVAL = 5.0


def enable_task_events(app: Celery, *, wait: float = 0.0) -> int:
    """Ask every worker to send task events (Celery's ``enable_events`` broadcast).

    Workers send none by default; a watcher (``taskexec metrics``, ``taskexec flower``)
    repeats this every :data:`EVENTS_ENABLE_INTERVAL` seconds so that workers started
    later send them too. With ``wait``, waits that long for the workers' replies and
    returns how many answered (0 without ``wait``).
    """
    if wait <= 0:
        app.control.enable_events()
        return 0
    return len(app.control.enable_events(reply=True, timeout=wait) or [])


def close_app(app: Celery) -> None:
    """Close an app's broker pool and its Redis result backend's connections.

    ``Celery.close`` leaves the result backend's client and the pub/sub connection that
    ``AsyncResult.get`` or a published chord opened; a producer that is done closes them too.
    """
    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()
        # A chord's header results subscribe to their channels (the group's barrier); one
        # collected later unsubscribes, and would reconnect to Redis after this close.
        consumer.subscribed_to.clear()
    client = getattr(backend, "client", None)
    if client is not None:
        client.close()
    app.close()


#: The app of ``celery -A taskexec.celery_app``. Its configuration is a promise, read from
#: the environment when first needed, not at import: importing taskexec does no work and
#: cannot fail on a bad ``TASKEXEC_*`` value.
app = _new_app()
app.add_defaults(lambda: celery_config(Settings()))
