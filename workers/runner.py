"""What one delivery of ``execute`` or ``validate`` does, as plain functions.

The Celery tasks in :mod:`workers.tasks` only map an :class:`~workers.attempt.Outcome` to
Celery's retry/replace/return. Celery delivers at least once, so every step starts from
the store and ends with a conditional write:

1. **Read** the task's row. Terminal: nothing to do. ``running`` under a live lease (in
   the store, or in Redis when the store could not be renewed): another copy runs it, come
   back when the lease would end. ``running`` with both leases run out: its worker was
   lost, take it over (``error``/E011 once its attempts are used up).
2. **Flow control** without spending an attempt: a slot of the run's ``concurrency`` and a
   token of the task's ``rate_limit`` (both in Redis); refused, come back later (the due
   time goes to the store, so a worker that dies holding the delayed message loses nothing).
3. **Claim** the next attempt with one conditional UPDATE, leased to this worker.
4. **Run** the attempt (:class:`~workers.attempt.Attempt`): the handler under its time
   limit, counted around the handler alone (:mod:`workers.timelimit`), then its outcome,
   written only if this attempt still holds the task, and held until the store takes it.
"""

from __future__ import annotations

import contextlib
import random
import time
from datetime import timedelta
from typing import Any

from redis import RedisError
from sqlalchemy.orm import Session

from taskexec.errors import CriteriaError, PlanError, RunNotFoundError
from taskexec.models import Change, ErrorCode, ManifestTask, RunManifest, TaskStatus
from taskexec.plan import templates
from taskexec.run import events, faultpoints
from taskexec.run.liveness import alive
from taskexec.run.ratelimit import bucket_key, holder, slots_key
from taskexec.store import repository as repo
from taskexec.store import results
from taskexec.store.manifests import CompiledRun, compiled_run
from taskexec.store.tables import utcnow
from workers.artifacts import resolve_inputs
from workers.attempt import Attempt, Outcome, current_status, maybe_stop, record, settled
from workers.handlers import resolve
from workers.runtime import Runtime
from workers.validators import evaluate

__all__ = ["SHORT_WAIT", "execute", "validate"]

_T = TaskStatus

#: Seconds a refused task waits in its worker for a reserved token rather than re-queue.
SHORT_WAIT = 0.05


def _jitter(seconds: float) -> float:
    # Spread the retries of tasks that were refused together.
    return seconds + random.uniform(0, min(1.0, 0.1 + seconds * 0.1))


def execute(rt: Runtime, run_id: str, task_id: str, *, detached: bool = False) -> Outcome:
    """One delivery of ``execute``.

    Args:
        rt: This process's runtime.
        run_id: The run.
        task_id: The task of the run.
        detached: Sent outside a stage's chord (by the reconciler, or for a long backoff):
            when the task ends, this step itself dispatches the next stage if it is due.
    """
    now = utcnow()
    stopped: list[Change] | None = None  # the task of a stopped run, cancelled here
    with rt.store.begin() as s:
        cr = compiled_run(s, run_id)
        task = cr.tasks.get(task_id)
        if task is None:
            raise RunNotFoundError(f"no task {task_id!r} in run {run_id!r}", path="TASK")
        state = repo.task_state(s, run_id, task_id)
        leased = state.lease_until is not None and state.lease_until > now
        if state.status is _T.RUNNING and not leased:
            # The store's lease ran out; the attempt may still be held by a live worker that
            # could not renew it (the store was down): its Redis lease says so.
            leased = alive(rt.redis, run_id, task_id, state.attempts)
        if state.stop_reason is not None and not state.status.terminal and not leased:
            # The durable flag: nothing of a stopped run starts, whatever message arrives.
            change = repo.set_task_status(
                s,
                run_id,
                task_id,
                _T.CANCELLED,
                allowed_from=[_T.PENDING, _T.QUEUED, _T.RETRYING, _T.RUNNING],
                error_code=ErrorCode.CANCELLED,
                message=f"run stopped: {state.stop_reason}",
                lease_until=None,
            )
            stopped = [change] if change else []
        # The usual case, a queued task with no limit to ask: claimed in this transaction.
        claimed: Claim | None = None
        due = state.status is _T.QUEUED or (
            state.status is _T.RETRYING and (state.not_before is None or state.not_before <= now)
        )
        if stopped is None and due and task.rate_limit is None and not cr.manifest.concurrency:
            claimed = _claim(rt, s, cr, run_id, task, takeover=None)
    if stopped is not None:
        # Committed: what settles the run (finalize, release) reads the cancel, on its own
        # connection, and no lock of this transaction is held any more.
        events.publish(rt.redis, stopped)
        return settled(rt, run_id, task, _T.CANCELLED, detached, changed=bool(stopped))
    if claimed is not None:
        return _start(rt, run_id, task, state, claimed, None, detached)
    takeover: int | None = None
    if state.status.terminal:
        return settled(rt, run_id, task, state.status, detached, changed=False)
    if state.status is _T.RUNNING:
        if leased:
            # Another copy holds it (a redelivery, a duplicate publish): come back when its
            # lease would end. Returning now would count this chord part before the task ends.
            if state.lease_until is not None and state.lease_until > now:
                left = (state.lease_until - now).total_seconds()
            else:  # held in Redis only: its worker waits for the store
                left = rt.settings.lease_seconds / 3
            reason = f"running on {state.worker} (attempt {state.attempts})"
            return Outcome(record(run_id, task_id, state.status), again_in=_jitter(left), reason=reason)
        if state.used >= task.retry.max_attempts:
            return _lost(rt, run_id, task, state, detached)
        takeover = state.attempts
    elif state.status is _T.RETRYING and state.not_before is not None and state.not_before > now:
        if state.deferred:
            return Outcome(record(run_id, task_id, state.status))  # the reconciler sends it when due
        left = (state.not_before - now).total_seconds()
        return Outcome(record(run_id, task_id, state.status), again_in=left, reason="backoff")
    elif state.status not in (_T.QUEUED, _T.RETRYING):
        return Outcome(record(run_id, task_id, state.status))  # pending or validating: not ours
    _import_handler(rt, task)
    waited = _flow_control(rt, run_id, state.tenant, cr.manifest, task)
    if waited is not None:
        return waited
    slot = slots_key(run_id) if cr.manifest.concurrency else None
    try:
        with rt.store.begin() as s:
            claimed = _claim(rt, s, cr, run_id, task, takeover=takeover)
    except BaseException:
        _release(rt, slot, task_id)
        raise
    return _start(rt, run_id, task, state, claimed, slot, detached)


#: A claim: the attempt (``None``: another copy got it), the inputs, and the task with its
#: params rendered, or why they could not be (an E001 message).
Claim = tuple[int | None, dict[str, Any], ManifestTask | str]


def _claim(
    rt: Runtime, s: Session, cr: CompiledRun, run_id: str, task: ManifestTask, *, takeover: int | None
) -> Claim:
    """Claim the task's next attempt under a lease, read its inputs and render its params.

    The rendered params go to the store in the claim's transaction (secrets are resolved
    later, from their variables, and never rendered): ``status`` shows what the handler got.
    """
    until = utcnow() + timedelta(seconds=rt.settings.lease_seconds)
    attempt = repo.claim_attempt(s, run_id, task.id, rt.worker, lease_until=until, takeover_from=takeover)
    if not attempt:
        return None, {}, task
    try:
        inputs = resolve_inputs(s, cr, run_id, task)
        if not task.params or not templates.has_templates(task.params):
            return attempt, inputs, task
        context = {
            "params": cr.manifest.param_values,
            "case": task.case or {},
            "inputs": inputs,
            "run": {"id": run_id},
            "task": {"id": task.id, "attempt": attempt},
        }
        params = templates.render(task.params, context)
    except PlanError as e:
        return attempt, {}, str(e)
    except templates.TemplateProblem as e:
        where = f"{task.source}.{e.where}" if task.source else e.where
        return (
            attempt,
            {},
            f"{ErrorCode.VALIDATION.value} {where}: task {task.id!r}: {e.expression.strip()}: {e.reason}",
        )
    repo.record_params(s, run_id, task.id, params)
    return attempt, inputs, task.model_copy(update={"params": params})


def _start(
    rt: Runtime,
    run_id: str,
    task: ManifestTask,
    state: repo.TaskState,
    claimed: Claim,
    slot: str | None,
    detached: bool,
) -> Outcome:
    """Run a claimed attempt (or wait for the copy that claimed it)."""
    number, inputs, ready = claimed
    if number is None:
        _release(rt, slot, task.id)
        return _wait_for_the_claimer(rt, run_id, task.id)
    faultpoints.reached("execute.claimed")
    events.publish(rt.redis, [Change(run_id, task.id, _T.RUNNING.value, number)])
    try:
        if isinstance(ready, str):  # its inputs or params could not be made: no handler runs
            attempt = Attempt(rt, run_id, task, number, state.retry_base, detached)
            return attempt.ended(_T.FAILED, ErrorCode.VALIDATION, ready.removeprefix("E001 "))
        return Attempt(rt, run_id, ready, number, state.retry_base, detached).run(inputs, slot)
    finally:
        _release(rt, slot, task.id)


def _wait_for_the_claimer(rt: Runtime, run_id: str, task_id: str) -> Outcome:
    """The claim went to another copy of the task: wait for it like any other holder."""
    with rt.store.begin() as s:
        state = repo.task_state(s, run_id, task_id)
    if state.status.terminal or state.status in (_T.VALIDATING, _T.PENDING):
        return Outcome(record(run_id, task_id, state.status))
    return Outcome(
        record(run_id, task_id, state.status), again_in=_jitter(1.0), reason=f"claimed by {state.worker}"
    )


def _import_handler(rt: Runtime, task: ManifestTask) -> None:
    """Import the task's handler before it asks for a token or a slot.

    A token's time is then its handler's start, not the start of an import that may take
    a second (a client library, a model): tokens granted together would otherwise reach
    the API late and bunch up with the next ones. A failure is left to the attempt, which
    meets it again and records it (E010, or the error the module raised).
    """
    with contextlib.suppress(Exception):
        resolve(task.handler, rt.settings)


def _flow_control(
    rt: Runtime, run_id: str, tenant: str | None, manifest: RunManifest, task: ManifestTask
) -> Outcome | None:
    """A concurrency slot, then a rate-limit token; ``None`` when the task may run now.

    The slot comes first: it is given back at once when the token is refused, while a
    token taken for a task that then finds no slot would be lost to the limit.
    """
    waits: list[tuple[float, str]] = []
    slot = slots_key(run_id) if manifest.concurrency else None
    if slot is not None and manifest.concurrency is not None:
        got = rt.slots.take(slot, manifest.concurrency, holder=task.id, lease=rt.settings.lease_seconds)
        if not got.granted:
            waits.append((max(0.2, got.wait), f"concurrency {manifest.concurrency} of the run reached"))
    if not waits and task.rate_limit is not None:
        limit = manifest.rate_limits[task.rate_limit]
        key = bucket_key(task.rate_limit, limit, run_id=run_id, tenant=tenant)
        asker = holder(run_id, task.id)
        grant = rt.limiter.acquire(key, limit, holder=asker)
        if not grant.granted and grant.wait <= SHORT_WAIT:
            # A token reserved for a few milliseconds from now: waiting here is cheaper
            # than a trip through the broker, which would make the task late for it.
            time.sleep(grant.wait)
            grant = rt.limiter.acquire(key, limit, holder=asker)
        if not grant.granted:
            _release(rt, slot, task.id)
            if rt.limiter.redis.exists(events.cancel_key(run_id)):
                # Cancelled while it asked: the run's reserved tokens may already have been
                # given back (lifecycle.finalize), so this one gives back its own.
                rt.limiter.give_back(key, limit, run_id=run_id, task_id=task.id)
            waits.append((grant.wait, f"rate limit {task.rate_limit!r}: {grant.waiting} waiting"))
    if not waits:
        return None
    wait, reason = waits[0]
    rate_limited = "rate limit" in reason
    # A token is reserved for its time: no jitter. Slots free up for whoever asks first.
    again = wait if rate_limited else _jitter(wait)
    # A countdown is held in a worker's memory, and Redis delivers it again past the
    # visibility timeout: a long wait is spent in several, the task asking again between.
    again = min(again, rt.settings.max_throttle_wait, rt.settings.visibility_timeout / 2)
    with rt.store.begin() as s:
        # The due time goes to the store: if this worker dies holding the delayed message,
        # the reconciler sends the task again once it is well past.
        repo.count_throttled(s, run_id, task.id, due=utcnow() + timedelta(seconds=again))
    data = {"wait": round(again, 3), "limit": task.rate_limit if rate_limited else "concurrency"}
    message = f"{reason}; again in {again:.2f} s"
    events.publish(rt.redis, [Change(run_id, task.id, "throttled", 0, None, message, data)])
    return Outcome(record(run_id, task.id, _T.QUEUED), again_in=again, reason=reason)


def _release(rt: Runtime, slot: str | None, task_id: str) -> None:
    if slot is not None:
        with contextlib.suppress(RedisError):
            rt.slots.release(slot, holder=task_id)


def _lost(rt: Runtime, run_id: str, task: ManifestTask, state: repo.TaskState, detached: bool) -> Outcome:
    """The worker of the last allowed attempt was lost: the task ends ``error``/E011."""
    message = f"the worker running attempt {state.attempts} ({state.worker}) was lost"
    with rt.store.begin() as s:
        change = repo.set_task_status(
            s,
            run_id,
            task.id,
            _T.ERROR,
            allowed_from=[_T.RUNNING],
            attempt=state.attempts,
            error_code=ErrorCode.WORKER_LOST,
            message=message,
            lease_until=None,
        )
        if change is not None:
            maybe_stop(s, run_id, _T.ERROR)
    if change is None:
        return _wait_for_the_claimer(rt, run_id, task.id)
    events.publish(rt.redis, [change])
    return settled(rt, run_id, task, _T.ERROR, detached)


def validate(rt: Runtime, task_record: dict[str, Any]) -> Outcome:
    """One delivery of ``validate``: check a ``validating`` task's output against its criteria."""
    if not isinstance(task_record, dict) or not all(
        isinstance(task_record.get(k), str) for k in ("run_id", "task_id")
    ):
        raise RunNotFoundError(f"not a task record: {str(task_record)[:200]}", path="validate")
    run_id, task_id = task_record["run_id"], task_record["task_id"]
    detached = bool(task_record.get("detached"))
    if task_record.get("status") != _T.VALIDATING.value:
        return Outcome(task_record)
    with rt.store.begin() as s:
        task = compiled_run(s, run_id).tasks[task_id]
        row = results.task_result(s, run_id, task_id)
        base = repo.task_state(s, run_id, task_id).retry_base
    if row.status is not _T.VALIDATING:
        return Outcome(record(run_id, task_id, row.status))
    attempt = Attempt(rt, run_id, task, row.attempts, base, detached)
    try:
        verdicts = evaluate(task.validate_, row.output)
    except CriteriaError as e:
        return attempt.ended(_T.ERROR, ErrorCode.CRITERIA_ERROR, e.message)
    failed = [r.message for r in verdicts if not r.passed]
    if not failed:
        with rt.store.begin() as s:
            change = repo.set_task_status(
                s, run_id, task_id, _T.SUCCEEDED, allowed_from=[_T.VALIDATING], attempt=row.attempts
            )
            stopping = repo.stop_reason(s, run_id) == "cancelled"
        if change is None:
            return Outcome(record(run_id, task_id, current_status(rt, run_id, task_id)))
        events.publish(rt.redis, [change])
        return settled(rt, run_id, task, _T.SUCCEEDED, detached, stopping=stopping)
    return attempt.failed(_T.VALIDATION_FAILED, "output criteria not met: " + "; ".join(failed), None)
