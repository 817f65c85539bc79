"""The producer's requests: submit, cancel, resume, decide an approval, retry failed tasks.

Each one commits its writes to the store before it sends any message: a producer that dies
in between leaves a state the reconciler carries on (a queued run it dispatches, a settled
stage it releases).

Example:
    >>> run_id = submit(services, manifest)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import uuid

from redis import Redis, RedisError

from taskexec.errors import BrokerUnavailableError, ConflictError, InvalidInputError
from taskexec.models import Change, ErrorCode, RunManifest, RunStatus, TaskStatus
from taskexec.run import events, faultpoints
from taskexec.run.dispatch import republish
from taskexec.run.lifecycle import finalize, request_stop, stop_waiting
from taskexec.run.messages import message_id, send_dispatch, send_release
from taskexec.services import Services
from taskexec.store import repository as repo
from taskexec.store.tables import utcnow

__all__ = ["cancel", "check_broker", "decide", "resume", "retry_run", "submit"]

_T = TaskStatus

log = logging.getLogger(__name__)

#: How long the cancel flag stays in Redis (handlers poll it; the store holds the truth).
CANCEL_FLAG_SECONDS = 7 * 24 * 3600


def check_broker(redis: Redis | None) -> None:
    """Ping Redis; :class:`BrokerUnavailableError` (exit 3) when it does not answer."""
    try:
        if redis is None:
            raise OSError("no Redis configured")
        redis.ping()
    except (RedisError, OSError) as e:
        raise BrokerUnavailableError(f"cannot reach the broker: {e}") from e


def submit(
    svc: Services, manifest: RunManifest, *, tenant: str | None = None, labels: dict[str, str] | None = None
) -> str:
    """Persist a run and its tasks in one transaction, then dispatch its first stage.

    Returns:
        The new run's id.
    """
    check_broker(svc.redis)
    run_id = uuid.uuid4().hex
    with svc.store.begin() as s:
        repo.add_run(s, run_id, manifest, tenant=tenant, labels=labels)
    faultpoints.reached("submit.committed")
    events.publish(svc.redis, [Change(run_id, None, RunStatus.QUEUED.value)])
    send_dispatch(svc.app, run_id, 0)  # lost with the producer: the reconciler sends it after a grace
    return run_id


def cancel(svc: Services, run_id: str, *, reason: str = "cancelled", by: str | None = None) -> RunStatus:
    """Cancel a run: a durable flag, waiting work cancelled and revoked, running handlers told.

    The run ends ``cancelled`` as soon as no task of it is running (at once when none is);
    with ``reason="timeout"`` (an embedded ``taskexec run --timeout``) it ends ``timed_out``,
    as a plan's ``stop.timeout`` ends it. ``by`` (who asked) is recorded in the run's
    history. Returns the run's status after the call.
    """
    with svc.store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return RunStatus(run.status)
        repo.set_stop_reason(s, run_id, reason, overwrite=True)
        if by is not None:
            repo.log_line(s, run_id, None, 0, f"cancel requested by {by}", worker=by, event="action")
        statuses = repo.task_statuses(s, run_id)
        in_queue = [t for t, st in statuses.items() if st in (_T.QUEUED, _T.RETRYING)]
        changes = stop_waiting(s, run_id, reason)
        epoch = run.epoch
    if svc.redis is not None:
        # Without Redis, handlers learn it from the store at their next step.
        with contextlib.suppress(RedisError):
            svc.redis.set(events.cancel_key(run_id), "1", ex=CANCEL_FLAG_SECONDS)
    events.publish(svc.redis, changes)
    if in_queue:
        # Saves the workers a store lookup each; the durable flag is what guarantees it, so a
        # broadcast that fails (the broker just restarted, say) is logged, not raised.
        try:
            svc.app.control.revoke([message_id(run_id, t, epoch) for t in in_queue])
        except (RedisError, OSError) as e:
            log.warning("revoke of run %s's queued messages not broadcast: %s", run_id, e)
    finalize(svc, run_id)
    with svc.store.begin() as s:
        return RunStatus(repo.get_run(s, run_id).status)


def resume(svc: Services, run_id: str, *, by: str | None = None) -> int:
    """Send again, from the store alone, whatever of a run may have lost its messages.

    Every task with a message on its way or a worker on it gets a new message; no task's
    status changes. A task running under a live lease is not run again (the new copy waits
    for it), finished tasks stay finished, and the run never leaves ``running``: a client
    waiting on it sees no false end. A run that has ended has nothing to resume (``taskexec
    retry`` runs failed tasks again). ``by`` (who asked) is recorded in the run's history.
    Returns how many tasks were sent again.
    """
    check_broker(svc.redis)
    if by is not None:
        with svc.store.begin() as s:
            repo.get_run(s, run_id)
            repo.log_line(s, run_id, None, 0, f"resume requested by {by}", worker=by, event="action")
    return republish(svc, run_id, why="resumed")


def decide(
    svc: Services, run_id: str, task_id: str, *, approve: bool, by: str, reason: str | None = None
) -> TaskStatus:
    """Approve or reject a task waiting at an approval gate; what depends on it goes on.

    Approved, the task succeeds (its output says who, when and why); rejected, it fails with
    E012 and what depends on it is skipped. The decision is a row of ``execution_logs``.

    Raises:
        ConflictError: The task is not waiting for a decision, or was decided meanwhile (E001).
    """
    now = utcnow()
    verdict = "approved" if approve else "rejected"
    text = f"{verdict} by {by}" + (f": {reason}" if reason else "")
    with svc.store.begin() as s:
        state = repo.task_state(s, run_id, task_id)
        if state.status is not _T.WAITING_APPROVAL:
            raise ConflictError(
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
            raise ConflictError(f"task {task_id!r} was decided meanwhile", path="TASK")
        repo.log_line(s, run_id, task_id, state.attempts, text, worker=by, event="approval")
        limit = repo.load_manifest(repo.get_run(s, run_id)).stop.max_failures
        if not approve and limit and repo.count_failures(s, run_id) >= limit:
            request_stop(s, run_id, "max_failures")
    faultpoints.reached("decide.committed")
    events.publish(svc.redis, [change])
    send_release(svc.app, run_id)  # lost: the reconciler releases a run whose stage is settled
    return _T.SUCCEEDED if approve else _T.FAILED


def retry_run(
    svc: Services, run_id: str, task_ids: list[str] | None = None, *, by: str | None = None
) -> list[str]:
    """Run a run's failed (or the named) tasks again, in the same run, with fresh attempts.

    Tasks that ended without success (failed, validation_failed, timed_out, error, and those
    a stop cancelled), or the named ones, go back to pending with a new budget of attempts
    (attempt numbers keep counting, so every earlier attempt stays in the history); what
    was skipped or cancelled downstream of them goes back to pending too. Succeeded tasks
    and their outputs are kept. Returns the ids reopened.

    Raises:
        InvalidInputError: A named task is unknown, succeeded, or still running (E001).
    """
    reopen_from = [_T.FAILED, _T.VALIDATION_FAILED, _T.TIMED_OUT, _T.ERROR, _T.CANCELLED, _T.SKIPPED]
    with svc.store.begin() as s:
        run = repo.get_run(s, run_id)
        manifest = repo.load_manifest(run)
        statuses = repo.task_statuses(s, run_id)
        if task_ids:
            for k, tid in enumerate(task_ids):
                if tid not in statuses:
                    raise InvalidInputError(f"no task {tid!r} in run {run_id}", path=f"--task[{k}]")
                if statuses[tid] not in reopen_from:
                    raise InvalidInputError(
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
        if by is not None:
            text = f"retry of {len(reopened)} task(s) requested by {by}"
            repo.log_line(s, run_id, None, 0, text, worker=by, event="action")
        repo.start_retry(s, run_id)
        # A dag run's reopened tasks count their upstream tasks again; the free ones are
        # queued into the outbox here, and the release below sends them.
        changes += [c for c in repo.reset_blockers(s, run_id, reopened) if c.status != _T.QUEUED.value]
        if RunStatus(run.status) is not RunStatus.RUNNING:
            started = repo.set_run_status(
                s, run_id, RunStatus.RUNNING, message=f"retry of {len(reopened)} task(s)"
            )
            changes += [started] if started else []
    if svc.redis is not None:
        with contextlib.suppress(RedisError):
            svc.redis.delete(events.cancel_key(run_id))  # a cancelled run's handlers must not see it
    events.publish(svc.redis, changes)
    send_release(svc.app, run_id)
    return reopened
