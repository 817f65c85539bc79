"""The reconciler: finds work that no message will ever move on, and moves it on.

PostgreSQL is the source of truth and Redis is transient, so a run can be left where no
Celery message refers to it: Redis lost its data, a worker died holding a task or a
delayed message, a dispatcher died between its commit and its publish, a backoff waits in
the store. One round, run by the ``taskexec.reconcile`` task behind a Redis lock (one round
at a time in the whole fleet), looks for:

* runs whose broker lost its data since their last dispatch (the broker's identity key is
  new): every task of theirs with a message on its way or a worker on it is sent again
  (:func:`~taskexec.dispatch.republish`); a Redis restart that kept its data changes
  nothing;
* runs queued whose first dispatch message never arrived;
* stages complete in the store whose next stage was never dispatched;
* runs past their ``stop.timeout``, and stopping runs with nothing left running;
* running tasks whose lease ran out in the store *and* in Redis (their worker was lost): a
  new delivery takes them over; a worker that only lost the store still holds its task;
* tasks whose message is overdue: deferred backoffs that are due, and delayed messages
  (backoffs, rate-limit and slot waits, paced ETAs) still waiting ``TASKEXEC_RESEND_GRACE``
  past their due time, because the worker holding them in memory died;
* tasks left in the outbox for ``TASKEXEC_RESEND_GRACE`` (their dispatcher died or lost
  the broker between its commit and its publish).

Every action goes through the same idempotent steps as normal execution (conditional
claims, the run's stage cursor), so a round that overlaps normal progress changes nothing,
and a task sent twice runs once. A message is sent before the row that asked for it is
updated: a round that dies between the two sends it again, never not at all.

Example:
    >>> report = reconcile(app, store, client=redis_client)  # doctest: +SKIP
    >>> report.resumed, report.requeued  # doctest: +SKIP
    ([], ['3f2a…/score[4]'])
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from celery import Celery
from sqlalchemy import select

from taskexec.dispatch import (
    broker_instance,
    compiled_run,
    execute_signature,
    finalize,
    outbox_key,
    release,
    republish,
    request_stop,
    resend,
    send_dispatch,
    stage_settled,
)
from taskexec.errors import BrokerUnavailableError, PlanError
from taskexec.liveness import alive
from taskexec.models import ErrorCode, RunManifest, RunStatus, TaskStatus
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.store.tables import Execution, Run, utcnow

__all__ = ["LOCK", "Report", "reconcile", "send_detached"]

log = logging.getLogger(__name__)

#: The Redis lock that keeps reconciler rounds one at a time across the fleet.
LOCK = "taskexec:reconcile:lock"

_T = TaskStatus


@dataclass
class Report:
    """What one round did (``run/task`` ids)."""

    resumed: list[str] = field(default_factory=list)
    advanced: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.resumed or self.advanced or self.stopped or self.requeued)


def send_detached(app: Celery, store: Store, run_id: str, task_id: str, name: str) -> None:
    """Send one ``execute`` outside any chord: the task advances its run itself when it ends.

    ``name`` makes the message id (``run/task/name``) unique to why it was sent.
    """
    with store.begin() as s:
        task = compiled_run(s, run_id).tasks[task_id]
    sig = execute_signature(app, run_id, task, task_id=f"{run_id}/{task_id}/{name}", detached=True)
    sig.apply_async()


def reconcile(
    app: Celery,
    store: Store,
    *,
    client: redis.Redis | None,
    lease_grace: float = 0.0,
    grace: float = 60.0,
) -> Report:
    """One round of the reconciler (see the module docstring).

    Args:
        app: The Celery app to publish with.
        store: The result store.
        client: Redis for run events, cancel flags and the lease keys of live workers.
        lease_grace: Seconds past a lease's end before its task is taken over.
        grace: Seconds past a message's due time, or past its dispatch for one still in the
            outbox, before the task is sent again (``TASKEXEC_RESEND_GRACE``).
    """
    report = Report()
    current = broker_instance(app)
    with store.begin() as s:
        runs = s.execute(
            select(
                Run.run_id,
                Run.status,
                Run.broker_instance,
                Run.stage_cursor,
                Run.stop_reason,
                Run.started_at,
                Run.submitted_at,
            ).where(Run.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value]))
        ).all()
    for run_id, status, instance, cursor, stop_reason, started_at, submitted_at in runs:
        since = started_at or submitted_at
        try:
            _reconcile_run(
                app,
                store,
                client,
                report,
                run_id,
                status,
                instance,
                current,
                cursor,
                stop_reason,
                since,
                grace,
            )
        except BrokerUnavailableError:
            raise
        except Exception:
            log.exception("reconciling run %s failed", run_id)
    _take_over_lost(app, store, client, report, lease_grace, grace)
    _resend_overdue(app, store, client, report, grace)
    _expire_approvals(app, store, client, report)
    if report:
        log.info("reconciler: %s", report)
    return report


def _reconcile_run(
    app: Celery,
    store: Store,
    client: redis.Redis | None,
    report: Report,
    run_id: str,
    status: str,
    instance: str | None,
    current: str | None,
    cursor: int,
    stop_reason: str | None,
    since: datetime,
    grace: float,
) -> None:
    now = utcnow()
    if instance is not None and current is not None and instance != current:
        log.warning(
            "run %s: the broker lost its data since its last dispatch; sending its tasks again", run_id
        )
        republish(app, store, run_id, client=client, why="the broker lost its data")
        report.resumed.append(run_id)
        return
    if status == RunStatus.QUEUED.value and cursor < 0:
        if (now - since).total_seconds() > grace:
            send_dispatch(app, run_id, 0)  # the producer's message was lost; a duplicate is harmless
            report.advanced.append(run_id)
        return
    with store.begin() as s:
        manifest = RunManifest.model_validate(repo.get_run(s, run_id).manifest)
        limit = manifest.stop.timeout
        overdue = bool(limit) and (now - since).total_seconds() > (limit or 0)
        if stop_reason is None and overdue and request_stop(s, run_id, "timeout"):
            stop_reason = "timeout"
            report.stopped.append(run_id)
        if stop_reason is not None:
            waiting = [
                t
                for t, st in repo.task_statuses(s, run_id).items()
                if st in (_T.PENDING, _T.QUEUED, _T.RETRYING, _T.WAITING_APPROVAL)
            ]
            repo.set_tasks_status(
                s,
                run_id,
                waiting,
                _T.CANCELLED,
                allowed_from=[_T.PENDING, _T.QUEUED, _T.RETRYING, _T.WAITING_APPROVAL],
                error_code=ErrorCode.CANCELLED,
                message=f"run stopped: {stop_reason}",
            )
            settled = False
        else:
            settled = cursor >= 0 and stage_settled(s, run_id, cursor)
    if stop_reason is not None:
        if client is not None:
            from taskexec import events

            with contextlib.suppress(redis.RedisError):
                client.set(events.cancel_key(run_id), "1", ex=7 * 24 * 3600)
        finalize(store, run_id, client=client)
        return
    if settled:
        # Held tasks now free, the next stage (claimed by the cursor: once only), or the end.
        release(app, store, run_id, client=client)
        report.advanced.append(run_id)


def _expire_approvals(app: Celery, store: Store, client: redis.Redis | None, report: Report) -> None:
    """Approval gates whose timeout passed without a decision are rejected (E012)."""
    from taskexec import producer

    with store.begin() as s:
        rows = s.execute(
            select(Execution.run_id, Execution.task_id, Execution.not_before)
            .join(Run, Run.run_id == Execution.run_id)
            .where(
                Run.status == RunStatus.RUNNING.value,
                Execution.status == _T.WAITING_APPROVAL.value,
                Execution.not_before < utcnow(),
            )
        ).all()
    for run_id, task_id, _ in rows:
        try:
            producer.decide(
                app,
                store,
                run_id,
                task_id,
                approve=False,
                by="taskexec",
                reason="no decision in time",
                client=client,
            )
        except PlanError:
            continue  # decided meanwhile
        report.stopped.append(f"{run_id}/{task_id}")


def _take_over_lost(
    app: Celery, store: Store, client: redis.Redis | None, report: Report, lease_grace: float, grace: float
) -> None:
    """Running tasks whose worker was lost: their lease ran out in the store and in Redis."""
    with store.begin() as s:
        rows = repo.lost_tasks(s, expired_before=utcnow() - timedelta(seconds=lease_grace))
    for run_id, task_id, attempts in rows:
        if alive(client, run_id, task_id, attempts):
            continue  # its worker renews the Redis lease: it waits for the store, it is not lost
        # One message per task and attempt per grace period: a round that comes back while
        # the first message still waits in a long queue sends no second one.
        key = f"taskexec:requeued:{run_id}/{task_id}/{attempts}"
        if client is not None and not client.set(key, "1", nx=True, ex=max(1, int(grace))):
            continue
        send_detached(app, store, run_id, task_id, f"r{attempts}")
        report.requeued.append(f"{run_id}/{task_id}")


def _resend_overdue(
    app: Celery, store: Store, client: redis.Redis | None, report: Report, grace: float
) -> None:
    """Tasks whose message is overdue (due long ago) or was never sent (left in the outbox),
    sent again run by run (:func:`~taskexec.dispatch.resend`)."""
    now = utcnow()
    with store.begin() as s:
        found = repo.overdue_tasks(s, now=now, late=now - timedelta(seconds=grace))
    by_run: dict[str, list[repo.Overdue]] = {}
    for task in found:
        if task.outbox is not None and client is not None:
            with contextlib.suppress(redis.RedisError):
                if client.exists(outbox_key(task.outbox)):
                    continue  # its publisher is alive and still sending
        by_run.setdefault(task.run_id, []).append(task)
    for run_id, tasks in by_run.items():
        try:
            sent = resend(app, store, run_id, tasks, client=client)
        except Exception:
            log.exception("sending overdue tasks of run %s again failed", run_id)
            continue
        report.requeued += [f"{run_id}/{t.task_id}" for t in tasks[:sent]]
