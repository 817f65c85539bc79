"""The reconciler: finds work that no message will ever move on, and moves it on.

PostgreSQL is the source of truth and Redis is transient, so a run can be left where no
Celery message refers to it: Redis restarted empty, a worker died holding a task, a
backoff waits in the store. One round, run by the ``taskexec.reconcile`` task behind a
Redis lock (one round at a time in the whole fleet), looks for:

* runs whose broker restarted since their last dispatch (a new Redis ``run_id``):
  their unfinished part is re-dispatched from the store, as ``taskexec resume`` does;
* runs queued whose first dispatch message never arrived;
* stages complete in the store whose next stage was never dispatched;
* runs past their ``stop.timeout``, and stopping runs with nothing left running;
* running tasks whose lease ran out (their worker was lost): a new delivery takes them over;
* retrying tasks that are due: deferred backoffs, and retries whose message is overdue.

Every action goes through the same idempotent steps as normal execution (conditional
claims, the run's stage cursor), so a round that overlaps normal progress changes nothing.

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
from sqlalchemy import and_, or_, select

from taskexec.dispatch import (
    broker_instance,
    compiled_run,
    execute_signature,
    finalize,
    release,
    request_stop,
    send_dispatch,
    stage_settled,
)
from taskexec.errors import BrokerUnavailableError, PlanError
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


def send_detached(app: Celery, store: Store, run_id: str, task_id: str, attempt: int) -> None:
    """Send one ``execute`` outside any chord: the task advances its run itself when it ends."""
    with store.begin() as s:
        task = compiled_run(s, run_id).tasks[task_id]
    sig = execute_signature(app, run_id, task, task_id=f"{run_id}/{task_id}/r{attempt}", detached=True)
    sig.apply_async()


def reconcile(
    app: Celery,
    store: Store,
    *,
    client: redis.Redis | None,
    lease_grace: float = 0.0,
    overdue: float = 60.0,
) -> Report:
    """One round of the reconciler (see the module docstring).

    Args:
        app: The Celery app to publish with.
        store: The result store.
        client: Redis for run events and cancel flags.
        lease_grace: Seconds past a lease's end before its task is taken over.
        overdue: Seconds past due before a retry whose message is missing is sent again.
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
                app, store, client, report, run_id, status, instance, current, cursor, stop_reason, since
            )
        except BrokerUnavailableError:
            raise
        except Exception:
            log.exception("reconciling run %s failed", run_id)
    _requeue_tasks(app, store, client, report, lease_grace, overdue)
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
) -> None:
    from taskexec import producer

    now = utcnow()
    if instance is not None and current is not None and instance != current:
        log.warning("run %s: the broker restarted since its last dispatch; resuming it", run_id)
        if client is not None:
            producer.resume(app, store, run_id, client=client)
        report.resumed.append(run_id)
        return
    if status == RunStatus.QUEUED.value and cursor < 0:
        if (now - since).total_seconds() > 60:
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


def _requeue_tasks(
    app: Celery, store: Store, client: redis.Redis | None, report: Report, lease_grace: float, overdue: float
) -> None:
    now = utcnow()
    with store.begin() as s:
        rows = s.execute(
            select(Execution.run_id, Execution.task_id, Execution.attempts)
            .join(Run, Run.run_id == Execution.run_id)
            .where(
                Run.status == RunStatus.RUNNING.value,
                or_(
                    and_(
                        Execution.status == _T.RUNNING.value,
                        Execution.lease_until < now - timedelta(seconds=lease_grace),
                    ),
                    and_(
                        Execution.status == _T.RETRYING.value,
                        or_(
                            and_(Execution.deferred.is_(True), Execution.not_before <= now),
                            Execution.not_before < now - timedelta(seconds=overdue),
                        ),
                    ),
                ),
            )
            .limit(10_000)
        ).all()
    for run_id, task_id, attempts in rows:
        # One message per task and attempt per `overdue` window: a round that comes back
        # while the first message still waits in a long queue sends no second one.
        key = f"taskexec:requeued:{run_id}/{task_id}/{attempts}"
        if client is not None and not client.set(key, "1", nx=True, ex=max(1, int(overdue))):
            continue
        send_detached(app, store, run_id, task_id, attempts)
        report.requeued.append(f"{run_id}/{task_id}")
