"""The Celery messages of a run: their ids, how each is built, and how a batch is sent.

Messages carry ids, never params or outputs. Every message that executes a task is built
by :func:`execute_signature`; a batch of tasks goes out as one chord
(``chord(group(execute | validate ...), body)``) by :func:`publish`, the only place that
sends one.

Publication is an outbox. The transaction that queued the tasks marked their rows with a
token (``executions.outbox``); :func:`publish` clears it once the broker took the chord,
and keeps a short-lived Redis key while it sends a large one. A dispatcher that dies, or
loses the broker, between the commit and the end of the send leaves the token: the
reconciler sends those tasks after ``TASKEXEC_RESEND_GRACE``; an extra copy is harmless,
the claim in the store lets one run. A broker failure is never the run's failure: it is
recorded on the run as an incident, and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery, chord, group
from celery.canvas import Signature
from redis import Redis, RedisError

from taskexec.celery_app import CONTROL, EXECUTOR, VALIDATOR
from taskexec.errors import DatabaseUnavailableError
from taskexec.models import ManifestTask
from taskexec.run import faultpoints
from taskexec.services import Services
from taskexec.store import repository as repo

__all__ = [
    "HARD_LIMIT_GRACE",
    "IDENTITY_KEY",
    "Publication",
    "broker_instance",
    "execute_signature",
    "message_id",
    "outbox_key",
    "publish",
    "send_dispatch",
    "send_notice",
    "send_release",
]

log = logging.getLogger(__name__)

#: Seconds a handler may run past its time limit before its process is ended.
HARD_LIMIT_GRACE = 10.0

#: A dag run's batches up to this size are sent without the "still publishing" key: they
#: go out in milliseconds, far within the reconciler's grace, and one goes after every task.
SMALL_BATCH = 100

#: The broker's identity: a token taskexec keeps in the broker's own Redis. A Redis that
#: restarted with its data (AOF, RDB) still has it; one that lost its data does not, and
#: the reconciler then sends again what the runs had in flight.
IDENTITY_KEY = "taskexec:broker:identity"


def message_id(run_id: str, task_id: str, epoch: int) -> str:
    """The Celery id of a task's execute message: known without a lookup, so cancel can revoke it."""
    return f"{run_id}/{task_id}/{epoch}"


def execute_signature(
    app: Celery,
    run_id: str,
    task: ManifestTask,
    *,
    task_id: str | None = None,
    detached: bool = False,
    countdown: float | None = None,
    eta: datetime | None = None,
) -> Signature:
    """The ``execute`` (``| validate`` when the task has criteria) of one task, with its
    priority and an ``argsrepr`` of ids (never params: they may hold secrets).

    Every message that executes a task is built here: a stage's chord, a re-execution after
    failed criteria, a detached delivery of the reconciler. No Celery time limit: the
    worker counts the task's ``timeout`` around its handler alone (``workers.timelimit``),
    so time spent waiting for the store is never charged to it. ``ignore_result``: nothing
    reads a task's Celery result (the store holds outcomes), and a producer outside a
    worker would otherwise subscribe to every message's result channel.
    """
    where = f"run={run_id} task={task.id} stage={task.stage}" + (" detached" if detached else "")
    opts: dict[str, Any] = {
        "queue": EXECUTOR,
        # Redis priority steps: 0 is consumed first; a plan's 9 is its highest priority.
        "priority": 9 - task.priority,
        "argsrepr": where,
        "ignore_result": True,
    }
    if task_id is not None:
        opts["task_id"] = task_id
    if countdown is not None:
        opts["countdown"] = countdown
    if eta is not None:
        opts["eta"] = eta
    kwargs = {"detached": True} if detached else {}
    sig = app.signature(
        "taskexec.execute", args=(run_id, task.id), kwargs=kwargs, options=opts, immutable=True
    )
    if task.validate_:
        check: dict[str, Any] = {
            "queue": VALIDATOR,
            "priority": 9 - task.priority,
            "argsrepr": where,
            "ignore_result": True,
        }
        if task_id is not None:
            check["task_id"] = f"{task_id}/v"
        sig = sig | app.signature("taskexec.validate", options=check)
    return sig


def send_dispatch(app: Celery, run_id: str, stage: int) -> None:
    """Ask a control worker to dispatch ``stage`` of a run (a new run's first stage).

    The producer publishes one small message rather than the stage's chord: the chord is
    built where every later one is.
    """
    app.send_task(
        "taskexec.dispatch",
        args=(run_id, stage),
        queue=CONTROL,
        ignore_result=True,
        argsrepr=f"run={run_id} stage={stage}",
    )


def send_release(app: Celery, run_id: str) -> None:
    """Ask a control worker to release a run's held tasks (after an approval, a retry)."""
    app.send_task(
        "taskexec.release", args=(run_id,), queue=CONTROL, ignore_result=True, argsrepr=f"run={run_id}"
    )


def send_notice(app: Celery, run_id: str, event: str, task_id: str | None = None) -> None:
    """Queue a webhook notice (``taskexec.notify``); it never blocks or fails the run."""
    try:
        app.send_task(
            "taskexec.notify",
            args=(run_id, event, task_id),
            queue=CONTROL,
            ignore_result=True,
            argsrepr=f"run={run_id} event={event}" + (f" task={task_id}" if task_id else ""),
        )
    except Exception as e:  # the broker is down: the run's own state is already safe
        log.warning("notice %s of run %s not sent: %s", event, run_id, e)


def broker_instance(app: Celery) -> str | None:
    """The broker's identity (:data:`IDENTITY_KEY`), created when missing.

    Not Redis's own ``run_id``: that changes at every restart, even one that kept every
    message (AOF), and sending a run's tasks again then is wasted work at best.
    """
    with app.connection_for_write() as conn:
        broker = conn.default_channel.client
        token = broker.get(IDENTITY_KEY)
        if token is None:
            broker.set(IDENTITY_KEY, uuid.uuid4().hex, nx=True)
            token = broker.get(IDENTITY_KEY)
        if isinstance(token, bytes):
            return token.decode()
        return str(token) if token is not None else None


@dataclass
class Publication:
    """Tasks queued by one committed transaction, to be sent after it: one outbox token."""

    tasks: list[ManifestTask]
    epoch: int
    token: str
    pace: dict[str, datetime] = field(default_factory=dict)
    #: Added to the message ids of copies sent again in the same epoch (the reconciler's).
    suffix: str = ""
    #: Sent outside any chord (an ``execution: dag`` run): each task moves its run on
    #: itself when it ends (``detached``), and the batch is a plain group.
    detached: bool = False

    @classmethod
    def new(cls, tasks: list[ManifestTask], epoch: int, **kw: Any) -> Publication:
        """A publication under a fresh outbox token."""
        return cls(tasks, epoch, uuid.uuid4().hex, **kw)


def outbox_key(token: str) -> str:
    """The Redis key a live publisher keeps while it sends the messages of ``token``."""
    return f"taskexec:outbox:{token}"


class _Sending(threading.Thread):
    """Says "still publishing" (a short-lived Redis key) while a large chord goes out.

    A chord of 20,000 tasks takes a minute to publish; without this the reconciler would
    take its rows, still in the outbox, for a dispatcher that died, and send them again.
    """

    def __init__(self, redis: Redis | None, token: str, ttl: float) -> None:
        super().__init__(name=f"outbox {token}", daemon=True)
        self.redis, self.key, self.ttl = redis, outbox_key(token), ttl
        self.done = threading.Event()

    def beat(self) -> None:
        if self.redis is not None:
            with contextlib.suppress(RedisError):
                self.redis.set(self.key, "1", px=max(1, int(self.ttl * 1000)))

    def run(self) -> None:
        while not self.done.wait(self.ttl / 3):
            self.beat()

    def __enter__(self) -> _Sending:
        self.beat()
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        if self.redis is not None:
            with contextlib.suppress(RedisError):
                self.redis.delete(self.key)


def _chord(app: Celery, run_id: str, stage: int | None, header: list[Signature]) -> Signature:
    """The chord of a batch: its body advances the run (``stage``) or releases it (``None``)."""
    if stage is None:
        body = app.signature(
            "taskexec.release",
            args=(run_id,),
            immutable=True,
            options={"queue": CONTROL, "argsrepr": f"run={run_id}", "ignore_result": True},
        )
    else:
        body = app.signature(
            "taskexec.advance",
            args=(run_id, stage + 1),
            immutable=True,
            options={"queue": CONTROL, "argsrepr": f"run={run_id} stage={stage + 1}", "ignore_result": True},
        )
    on_error = app.signature(
        "taskexec.stage_failed",
        args=(run_id, -1 if stage is None else stage),
        immutable=True,
        options={"queue": CONTROL, "argsrepr": f"run={run_id} stage={stage}", "ignore_result": True},
    )
    body.link_error(on_error)
    return chord(header, body, app=app)


def publish(svc: Services, run_id: str, stage: int | None, p: Publication) -> bool:
    """Send a chord of queued tasks, then take them out of the outbox; false if the broker
    refused it (the run goes on: the reconciler sends what is still in the outbox).

    ``stage`` is the stage dispatched (its body dispatches the next one), or ``None`` for a
    batch of released or re-sent tasks (its body releases the run again). A detached
    publication (a ``dag`` run's) is a plain group: each task moves its run on when it ends.
    """
    app = svc.app
    header = [
        execute_signature(
            app,
            run_id,
            t,
            task_id=message_id(run_id, t.id, p.epoch) + (f".{p.suffix}" if p.suffix else ""),
            eta=p.pace.get(t.id),
            detached=p.detached,
        )
        for t in p.tasks
    ]
    sending = group(header, app=app) if p.detached else _chord(app, run_id, stage, header)
    try:
        faultpoints.reached("dispatch.committed")
        if p.detached and len(p.tasks) <= SMALL_BATCH:
            sending.apply_async()  # milliseconds: no key (a thread, two trips) after every task
        else:
            with _Sending(svc.redis, p.token, ttl=max(1.0, svc.settings.resend_grace / 2)):
                sending.apply_async()
        faultpoints.reached("dispatch.published")
        instance = broker_instance(app)
    except Exception as e:  # kombu and redis-py raise many types for one broken connection
        what = f"messages of {len(p.tasks)} task(s) not sent ({type(e).__name__}: {e})"
        log.warning("run %s: %s; the reconciler sends them", run_id, what)
        try:
            with svc.store.begin() as s:
                repo.record_incident(s, run_id, f"{what}; the reconciler sends them")
        except DatabaseUnavailableError:
            pass  # the outbox holds them all the same
        return False
    with svc.store.begin() as s:
        repo.clear_outbox(s, run_id, p.token)
        repo.set_broker_instance(s, run_id, instance)
    return True
