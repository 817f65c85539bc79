"""Submit, cancel and resume runs: the producer's writes, each committed before any message.

Example:
    >>> run_id = submit(app, store, manifest, client=redis_client)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import uuid

import redis
from celery import Celery
from sqlalchemy import update

from taskexec import events, faultpoints
from taskexec.dispatch import finalize, message_id, republish, request_stop, send_dispatch, send_release
from taskexec.errors import BrokerUnavailableError, PlanError
from taskexec.models import ErrorCode, RunManifest, RunStatus, TaskStatus
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.store.tables import Run, utcnow

__all__ = ["cancel", "check_broker", "decide", "resume", "retry_run", "submit"]

_T = TaskStatus

log = logging.getLogger(__name__)


def check_broker(client: redis.Redis) -> None:
    """Ping Redis; :class:`BrokerUnavailableError` (exit 3) when it does not answer."""
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        raise BrokerUnavailableError(f"cannot reach the broker: {e}") from e


def submit(
    app: Celery,
    store: Store,
    manifest: RunManifest,
    *,
    client: redis.Redis,
    tenant: str | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """Persist a run and its tasks in one transaction, then dispatch its first stage.

    Returns:
        The new run's id.
    """
    check_broker(client)
    run_id = uuid.uuid4().hex
    with store.begin() as s:
        repo.add_run(s, run_id, manifest, tenant=tenant, labels=labels)
    faultpoints.reached("submit.committed")
    events.publish(client, [repo.Change(run_id, None, RunStatus.QUEUED.value)])
    send_dispatch(app, run_id, 0)  # lost with the producer: the reconciler sends it after a grace
    return run_id


def cancel(app: Celery, store: Store, run_id: str, *, client: redis.Redis | None) -> RunStatus:
    """Cancel a run: a durable flag, queued work cancelled and revoked, running handlers told.

    The run ends ``cancelled`` as soon as no task of it is running (at once when none is).
    Returns the run's status after the call.
    """
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return RunStatus(run.status)
        if not request_stop(s, run_id, "cancelled"):
            s.execute(update(Run).where(Run.run_id == run_id).values(stop_reason="cancelled"))
        statuses = repo.task_statuses(s, run_id)
        waiting = [t for t, st in statuses.items() if st in (_T.QUEUED, _T.RETRYING)]
        changes = repo.set_tasks_status(
            s,
            run_id,
            [t for t, st in statuses.items() if not st.terminal],
            _T.CANCELLED,
            allowed_from=[_T.PENDING, _T.QUEUED, _T.RETRYING],
            error_code=ErrorCode.CANCELLED,
            message="cancelled",
        )
        epoch = run.epoch
    if client is not None:
        # Without Redis, handlers learn it from the store at their next step.
        with contextlib.suppress(redis.RedisError):
            client.set(events.cancel_key(run_id), "1", ex=7 * 24 * 3600)
    events.publish(client, changes)
    if waiting:
        # Saves the workers a store lookup each; the durable flag is what guarantees it, so a
        # broadcast that fails (the broker just restarted, say) is logged, not raised.
        try:
            app.control.revoke([message_id(run_id, t, epoch) for t in waiting])
        except (redis.RedisError, OSError) as e:
            log.warning("revoke of run %s's queued messages not broadcast: %s", run_id, e)
    finalize(store, run_id, client=client)
    with store.begin() as s:
        return RunStatus(repo.get_run(s, run_id).status)


def resume(app: Celery, store: Store, run_id: str, *, client: redis.Redis) -> int:
    """Send again, from the store alone, whatever of a run may have lost its messages.

    Every task with a message on its way or a worker on it gets a new message; no task's
    status changes. A task running under a live lease is not run again (the new copy waits
    for it), finished tasks stay finished, and the run never leaves ``running``: a client
    waiting on it sees no false end. A run that has ended has nothing to resume (``taskexec
    retry`` runs failed tasks again). Returns how many tasks were sent again.
    """
    check_broker(client)
    return republish(app, store, run_id, client=client, why="resumed")


def decide(
    app: Celery,
    store: Store,
    run_id: str,
    task_id: str,
    *,
    approve: bool,
    by: str,
    reason: str | None = None,
    client: redis.Redis | None = None,
) -> TaskStatus:
    """Approve or reject a task waiting at an approval gate; what depends on it goes on.

    Approved, the task succeeds (its output says who, when and why); rejected, it fails with
    E012 and what depends on it is skipped. The decision is a row of ``execution_logs``.

    Raises:
        PlanError: The task is not waiting for a decision (E001).
    """
    now = utcnow()
    verdict = "approved" if approve else "rejected"
    text = f"{verdict} by {by}" + (f": {reason}" if reason else "")
    with store.begin() as s:
        state = repo.task_state(s, run_id, task_id)
        if state.status is not _T.WAITING_APPROVAL:
            raise PlanError(
                f"task {task_id!r} is not waiting for approval (it is {state.status.value})", path="TASK"
            )
        if approve:
            output = {"approved": True, "by": by, "reason": reason, "at": now.isoformat()}
            change = repo.set_task_status(
                s,
                run_id,
                task_id,
                _T.SUCCEEDED,
                allowed_from=[_T.WAITING_APPROVAL],
                output=output,
                not_before=None,
            )
        else:
            change = repo.set_task_status(
                s,
                run_id,
                task_id,
                _T.FAILED,
                allowed_from=[_T.WAITING_APPROVAL],
                error_code=ErrorCode.APPROVAL_REJECTED,
                message=text,
                not_before=None,
            )
        if change is None:
            raise PlanError(f"task {task_id!r} was decided meanwhile", path="TASK")
        repo.log_line(s, run_id, task_id, state.attempts, text, worker=by, event="approval")
        limit = repo.load_manifest(repo.get_run(s, run_id)).stop.max_failures
        if not approve and limit and repo.count_failures(s, run_id) >= limit:
            request_stop(s, run_id, "max_failures")
    faultpoints.reached("decide.committed")
    events.publish(client, [change])
    send_release(app, run_id)  # lost: the reconciler releases a run whose stage is settled
    return _T.SUCCEEDED if approve else _T.FAILED


def retry_run(
    app: Celery,
    store: Store,
    run_id: str,
    task_ids: list[str] | None = None,
    *,
    client: redis.Redis | None = None,
) -> list[str]:
    """Run a run's failed (or the named) tasks again, in the same run, with fresh attempts.

    Tasks that ended without success (failed, validation_failed, timed_out, error, and those
    a stop cancelled), or the named ones, go back to pending with a new budget of attempts
    (attempt numbers keep counting, so every earlier attempt stays in the history); what
    was skipped or cancelled downstream of them goes back to pending too. Succeeded tasks
    and their outputs are kept. Returns the ids reopened.

    Raises:
        PlanError: A named task is unknown, succeeded, or still running (E001).
    """
    reopen_from = [_T.FAILED, _T.VALIDATION_FAILED, _T.TIMED_OUT, _T.ERROR, _T.CANCELLED, _T.SKIPPED]
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        manifest = repo.load_manifest(run)
        statuses = repo.task_statuses(s, run_id)
        if task_ids:
            for k, tid in enumerate(task_ids):
                if tid not in statuses:
                    raise PlanError(f"no task {tid!r} in run {run_id}", path=f"--task[{k}]")
                if statuses[tid] not in reopen_from:
                    raise PlanError(
                        f"task {tid!r} is {statuses[tid].value}: only tasks that ended without success "
                        "run again",
                        path=f"--task[{k}]",
                    )
            targets = set(task_ids)
        else:
            targets = {t for t, st in statuses.items() if st.failure or st is _T.CANCELLED}
        dependents: dict[str, list[str]] = {}
        for t in manifest.tasks:
            for d in t.depends_on:
                dependents.setdefault(d, []).append(t.id)
        todo, downstream = list(targets), set()
        while todo:
            for nxt in dependents.get(todo.pop(), []):
                if nxt not in downstream and statuses[nxt] in (_T.SKIPPED, _T.CANCELLED):
                    downstream.add(nxt)
                    todo.append(nxt)
        reopened = sorted(targets | downstream)
        if not reopened:
            return []
        changes = repo.reopen_tasks(s, run_id, reopened, message="run again by taskexec retry")
        s.execute(
            update(Run)
            .where(Run.run_id == run_id)
            .values(
                stop_reason=None,
                statistics=None,
                error_message=None,
                finished_at=None,
                epoch=Run.epoch + 1,  # new message ids: revoked ones of a cancel stay revoked
                updated_at=utcnow(),
            )
        )
        if RunStatus(run.status) is not RunStatus.RUNNING:
            started = repo.set_run_status(
                s, run_id, RunStatus.RUNNING, message=f"retry of {len(reopened)} task(s)"
            )
            changes += [started] if started else []
    if client is not None:
        with contextlib.suppress(redis.RedisError):
            client.delete(events.cancel_key(run_id))  # a cancelled run's handlers must not see it
    events.publish(client, changes)
    send_release(app, run_id)
    return reopened
