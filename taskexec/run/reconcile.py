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
* stages complete in the store whose next stage was never dispatched (in a ``dag`` run,
  a run whose tasks have all ended but which its last task's settle did not end);
* runs past their ``stop.timeout``, and stopping runs with nothing left running;
* running tasks whose lease ran out in the store *and* in Redis (their worker was lost): a
  new delivery takes them over; a worker that only lost the store still holds its task;
* tasks whose message is overdue: deferred backoffs that are due, and delayed messages
  (backoffs, rate-limit and slot waits, paced ETAs) still waiting ``TASKEXEC_RESEND_GRACE``
  past their due time, because the worker holding them in memory died;
* tasks left in the outbox for ``TASKEXEC_RESEND_GRACE`` (their dispatcher died or lost
  the broker between its commit and its publish; in a ``dag`` run, tasks released by the
  transaction that ended their last upstream task and not sent after it).

Every action goes through the same idempotent steps as normal execution (conditional
claims, the run's stage cursor), so a round that overlaps normal progress changes nothing,
and a task sent twice runs once. A message is sent before the row that asked for it is
updated: a round that dies between the two sends it again, never not at all.

Example:
    >>> report = reconcile(services, grace=60)  # doctest: +SKIP
    >>> report.resumed, report.requeued  # doctest: +SKIP
    ([], ['3f2a…/score[4]'])
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from redis import RedisError

from taskexec.errors import BrokerUnavailableError, ConflictError
from taskexec.run import events
from taskexec.run.dispatch import release, republish, resend
from taskexec.run.lifecycle import finalize, request_stop, stage_settled, stop_waiting
from taskexec.run.liveness import alive
from taskexec.run.messages import broker_instance, execute_signature, outbox_key, send_dispatch
from taskexec.run.producer import CANCEL_FLAG_SECONDS, decide
from taskexec.services import Services
from taskexec.store import repository as repo
from taskexec.store.manifests import compiled_run
from taskexec.store.tables import utcnow

__all__ = ["LOCK", "Report", "reconcile", "send_detached"]

log = logging.getLogger(__name__)

#: The Redis lock that keeps reconciler rounds one at a time across the fleet.
LOCK = "taskexec:reconcile:lock"


@dataclass
class Report:
    """What one round did (``run/task`` ids)."""

    resumed: list[str] = field(default_factory=list)
    advanced: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.resumed or self.advanced or self.stopped or self.requeued)


def send_detached(svc: Services, run_id: str, task_id: str, name: str) -> None:
    """Send one ``execute`` outside any chord: the task advances its run itself when it ends.

    ``name`` makes the message id (``run/task/name``) unique to why it was sent.
    """
    with svc.store.begin() as s:
        task = compiled_run(s, run_id).tasks[task_id]
    execute_signature(
        svc.app, run_id, task, task_id=f"{run_id}/{task_id}/{name}", detached=True
    ).apply_async()


@dataclass(frozen=True)
class _InFlight:
    """A run the round looks at, as the store had it when the round began."""

    run_id: str
    status: str
    instance: str | None
    cursor: int
    stop_reason: str | None
    since: datetime


def reconcile(svc: Services, *, lease_grace: float = 0.0, grace: float = 60.0) -> Report:
    """One round of the reconciler (see the module docstring).

    Args:
        svc: Settings, the Celery app to publish with, the store, and Redis (run events,
            cancel flags, the lease keys of live workers).
        lease_grace: Seconds past a lease's end before its task is taken over.
        grace: Seconds past a message's due time, or past its dispatch for one still in the
            outbox, before the task is sent again (``TASKEXEC_RESEND_GRACE``).
    """
    report = Report()
    current = broker_instance(svc.app)
    with svc.store.begin() as s:
        runs = [_InFlight(*row) for row in repo.runs_in_flight(s)]
    for run in runs:
        try:
            _reconcile_run(svc, report, run, current, grace)
        except BrokerUnavailableError:
            raise
        except Exception:
            log.exception("reconciling run %s failed", run.run_id)
    _take_over_lost(svc, report, lease_grace, grace)
    _resend_overdue(svc, report, grace)
    _expire_approvals(svc, report)
    if report:
        log.info("reconciler: %s", report)
    return report


def _reconcile_run(svc: Services, report: Report, run: _InFlight, current: str | None, grace: float) -> None:
    now = utcnow()
    run_id = run.run_id
    if run.instance is not None and current is not None and run.instance != current:
        log.warning(
            "run %s: the broker lost its data since its last dispatch; sending its tasks again", run_id
        )
        republish(svc, run_id, why="the broker lost its data")
        report.resumed.append(run_id)
        return
    if run.status == "queued" and run.cursor < 0:
        if (now - run.since).total_seconds() > grace:
            send_dispatch(svc.app, run_id, 0)  # the producer's message was lost; a duplicate is harmless
            report.advanced.append(run_id)
        return
    stop_reason = run.stop_reason
    with svc.store.begin() as s:
        limit = compiled_run(s, run_id).manifest.stop.timeout
        overdue = bool(limit) and (now - run.since).total_seconds() > (limit or 0)
        if stop_reason is None and overdue and request_stop(s, run_id, "timeout"):
            stop_reason = "timeout"
            report.stopped.append(run_id)
        if stop_reason is not None:
            events.publish(svc.redis, stop_waiting(s, run_id, stop_reason))
            settled = False
        elif repo.is_dag(s, run_id):
            # Released tasks never sent are outbox rows (sent below, past the grace); what
            # is left here is the end of a run whose last settle did not get to finalize it.
            settled = run.cursor >= 0 and not repo.unfinished(s, run_id)
        else:
            settled = run.cursor >= 0 and stage_settled(s, run_id, run.cursor)
    if stop_reason is not None:
        if svc.redis is not None:
            with contextlib.suppress(RedisError):
                svc.redis.set(events.cancel_key(run_id), "1", ex=CANCEL_FLAG_SECONDS)
        finalize(svc, run_id)
        return
    if settled:
        # Held tasks now free, the next stage (claimed by the cursor: once only), or the end.
        release(svc, run_id)
        report.advanced.append(run_id)


def _expire_approvals(svc: Services, report: Report) -> None:
    """Approval gates whose timeout passed without a decision are rejected (E012)."""
    with svc.store.begin() as s:
        rows = repo.expired_approvals(s, utcnow())
    for run_id, task_id in rows:
        try:
            decide(svc, run_id, task_id, approve=False, by="taskexec", reason="no decision in time")
        except ConflictError:
            continue  # decided meanwhile
        report.stopped.append(f"{run_id}/{task_id}")


def _take_over_lost(svc: Services, report: Report, lease_grace: float, grace: float) -> None:
    """Running tasks whose worker was lost: their lease ran out in the store and in Redis."""
    with svc.store.begin() as s:
        rows = repo.lost_tasks(s, expired_before=utcnow() - timedelta(seconds=lease_grace))
    for run_id, task_id, attempts in rows:
        if alive(svc.redis, run_id, task_id, attempts):
            continue  # its worker renews the Redis lease: it waits for the store, it is not lost
        # One message per task and attempt per grace period: a round that comes back while
        # the first message still waits in a long queue sends no second one.
        key = f"taskexec:requeued:{run_id}/{task_id}/{attempts}"
        if svc.redis is not None and not svc.redis.set(key, "1", nx=True, ex=max(1, int(grace))):
            continue
        send_detached(svc, run_id, task_id, f"r{attempts}")
        report.requeued.append(f"{run_id}/{task_id}")


def _resend_overdue(svc: Services, report: Report, grace: float) -> None:
    """Tasks whose message is overdue (due long ago) or was never sent (left in the outbox),
    sent again run by run (:func:`~taskexec.run.dispatch.resend`)."""
    now = utcnow()
    with svc.store.begin() as s:
        found = repo.overdue_tasks(s, now=now, late=now - timedelta(seconds=grace))
    by_run: dict[str, list[repo.Overdue]] = {}
    for task in found:
        if task.outbox is not None and svc.redis is not None:
            with contextlib.suppress(RedisError):
                if svc.redis.exists(outbox_key(task.outbox)):
                    continue  # its publisher is alive and still sending
        by_run.setdefault(task.run_id, []).append(task)
    for run_id, tasks in by_run.items():
        try:
            sent = resend(svc, run_id, tasks)
        except Exception:
            log.exception("sending overdue tasks of run %s again failed", run_id)
            continue
        report.requeued += [f"{run_id}/{t.task_id}" for t in tasks[:sent]]
