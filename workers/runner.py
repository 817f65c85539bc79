"""What one delivery of ``execute`` or ``validate`` does, as plain functions.

The Celery tasks in :mod:`workers.tasks` only map an :class:`Outcome` to Celery's
retry/replace/return. Celery delivers at least once, so every step starts from the
store and ends with a conditional write:

1. **Read** the task's row. Terminal: nothing to do. ``running`` under a live lease: another
   copy runs it, come back when the lease would end. ``running`` with an expired lease: its
   worker was lost, take it over (``error``/E011 once its attempts are used up).
2. **Flow control** without spending an attempt: a slot of the run's ``concurrency`` and a
   token of the task's ``rate_limit`` (both in Redis); refused, come back later.
3. **Claim** the next attempt with one conditional UPDATE, leased to this worker; a
   heartbeat thread renews the lease while the handler runs.
4. **Run** the handler under its time limit (counted around the handler alone, see
   :mod:`workers.timelimit`), then write the outcome only if this attempt still holds the
   task. The outcome is held until the store takes it, however long the store is down:
   the heartbeat keeps the attempt's lease alive in Redis meanwhile, so nobody takes the
   task over and the handler runs once.

Outcomes of a handler call:

==========================  ==================  ===================================
handler                     attempts remain     attempts used up
==========================  ==================  ===================================
returns an object           ``succeeded`` (or ``validating`` when it has criteria)
``RetryableError``          ``retrying``        ``failed``: E005, or E003 after one attempt
other exception             ``retrying``        ``error``: E005, or E003 after one attempt
soft time limit             ``retrying``        ``timed_out``: E002
``TaskFailed``              ``failed`` at once (E003; E001 for bad params)
``TaskCancelled``           ``cancelled``: E004
handler not allowed         ``error``: E010 at once
worker lost (lease ran out) ``running`` again   ``error``: E011
==========================  ==================  ===================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import redis
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from taskexec import events, faultpoints
from taskexec.celery_app import redis_url
from taskexec.dispatch import (
    HARD_LIMIT_GRACE,
    CompiledRun,
    compiled_run,
    finalize,
    release,
    request_stop,
    send_notice,
)
from taskexec.errors import (
    AwaitApproval,
    CriteriaError,
    DatabaseUnavailableError,
    HandlerNotAllowedError,
    RetryableError,
    RunNotFoundError,
    TaskCancelled,
    TaskFailed,
)
from taskexec.handlers import HandlerContext, check_output
from taskexec.liveness import alive
from taskexec.models import ErrorCode, ManifestTask, RunManifest, TaskStatus
from taskexec.ratelimit import RateLimiter, Slots, bucket_key, holder, slots_key
from taskexec.settings import Settings
from taskexec.store import Store, results
from taskexec.store import repository as repo
from taskexec.store.tables import utcnow
from workers import secrets
from workers.artifacts import resolve_inputs
from workers.handlers import load_modules, resolve
from workers.lease import CancelCheck, Heartbeat
from workers.timelimit import HandlerTimeLimit
from workers.validators import evaluate

__all__ = ["Outcome", "Runtime", "execute", "validate"]

log = logging.getLogger("taskexec.worker")

_T = TaskStatus
_W = TypeVar("_W")


@dataclass
class Runtime:
    """Per-process state of a worker: settings, store and Redis, created after fork."""

    settings: Settings
    store: Store
    redis: redis.Redis | None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        """A runtime for ``settings``: a store engine that rides out outages, a Redis client."""
        url = redis_url(settings)
        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5) if url else None
        load_modules(settings)
        return cls(settings, Store.from_settings(settings, retry=True), client)

    @property
    def limiter(self) -> RateLimiter:
        """Token buckets on this worker's Redis."""
        assert self.redis is not None, "rate limits need Redis"
        if not hasattr(self, "_limiter"):
            self._limiter = RateLimiter(self.redis)
        return self._limiter

    @property
    def slots(self) -> Slots:
        """Concurrency slots on this worker's Redis."""
        assert self.redis is not None, "concurrency caps need Redis"
        if not hasattr(self, "_slots"):
            self._slots = Slots(self.redis)
        return self._slots


@dataclass(frozen=True)
class Outcome:
    """What Celery should do after a step: return ``record``, or come back in ``again_in`` s."""

    record: dict[str, Any]
    again_in: float | None = None
    #: Why the task comes back later, for Celery's retry log line and Flower.
    reason: str = ""
    #: The wait does not spend an attempt (a token, a slot, another copy's lease).
    throttled: bool = False


def _record(run_id: str, task_id: str, status: TaskStatus) -> dict[str, Any]:
    # Ids and a status only: a chord collects these, never outputs.
    return {"run_id": run_id, "task_id": task_id, "status": status.value}


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
            events.publish(rt.redis, [change] if change else [])
            return _settled(rt, run_id, task, _T.CANCELLED, detached, changed=change is not None)
        # The usual case, a queued task with no limit to ask: claimed in this transaction.
        claimed: tuple[int | None, dict[str, Any]] | None = None
        due = state.status is _T.QUEUED or (
            state.status is _T.RETRYING and (state.not_before is None or state.not_before <= now)
        )
        if due and task.rate_limit is None and not cr.manifest.concurrency:
            claimed = _claim(rt, s, cr, run_id, task, takeover=None)
    if claimed is not None:
        return _start(rt, run_id, task, state, claimed, None, detached)
    takeover: int | None = None
    if state.status.terminal:
        return _settled(rt, run_id, task, state.status, detached, changed=False)
    if state.status is _T.RUNNING:
        if leased:
            # Another copy holds it (a redelivery, a duplicate publish): come back when its
            # lease would end. Returning now would count this chord part before the task ends.
            if state.lease_until is not None and state.lease_until > now:
                left = (state.lease_until - now).total_seconds()
            else:  # held in Redis only: its worker waits for the store
                left = rt.settings.lease_seconds / 3
            return Outcome(
                _record(run_id, task_id, state.status),
                again_in=_jitter(left),
                reason=f"running on {state.worker} (attempt {state.attempts})",
                throttled=True,
            )
        if state.used >= task.retry.max_attempts:
            return _lost(rt, run_id, task, state, detached)
        takeover = state.attempts
    elif state.status is _T.RETRYING and state.not_before is not None and state.not_before > now:
        if state.deferred:
            return Outcome(_record(run_id, task_id, state.status))  # the reconciler sends it when due
        left = (state.not_before - now).total_seconds()
        return Outcome(_record(run_id, task_id, state.status), again_in=left, reason="backoff")
    elif state.status not in (_T.QUEUED, _T.RETRYING):
        return Outcome(_record(run_id, task_id, state.status))  # pending or validating: not ours
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


def _claim(
    rt: Runtime, s: Session, cr: CompiledRun, run_id: str, task: ManifestTask, *, takeover: int | None
) -> tuple[int | None, dict[str, Any]]:
    """Claim the task's next attempt under a lease; the attempt (``None``: not claimed), inputs."""
    until = utcnow() + timedelta(seconds=rt.settings.lease_seconds)
    attempt = repo.claim_attempt(s, run_id, task.id, rt.worker, lease_until=until, takeover_from=takeover)
    return attempt, resolve_inputs(s, cr, run_id, task) if attempt else {}


def _start(
    rt: Runtime,
    run_id: str,
    task: ManifestTask,
    state: repo.TaskState,
    claimed: tuple[int | None, dict[str, Any]],
    slot: str | None,
    detached: bool,
) -> Outcome:
    """Run the handler of a claimed attempt (or wait for the copy that claimed it)."""
    attempt, inputs = claimed
    if attempt is None:
        _release(rt, slot, task.id)
        return execute_again_later(rt, run_id, task.id)
    faultpoints.reached("execute.claimed")
    events.publish(rt.redis, [repo.Change(run_id, task.id, _T.RUNNING.value, attempt)])
    try:
        return _run_handler(rt, run_id, task, attempt, state.retry_base, inputs, slot, detached)
    finally:
        _release(rt, slot, task.id)


def execute_again_later(rt: Runtime, run_id: str, task_id: str) -> Outcome:
    """The claim went to another copy of the task: wait for it like any other holder."""
    with rt.store.begin() as s:
        state = repo.task_state(s, run_id, task_id)
    if state.status.terminal or state.status in (_T.VALIDATING, _T.PENDING):
        return Outcome(_record(run_id, task_id, state.status))
    return Outcome(
        _record(run_id, task_id, state.status),
        again_in=_jitter(1.0),
        reason=f"claimed by {state.worker}",
        throttled=True,
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
            if rt.limiter.client.exists(events.cancel_key(run_id)):
                # Cancelled while it asked: the run's reserved tokens may already have been
                # given back (dispatch.finalize), so this one gives back its own.
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
    events.publish(rt.redis, [repo.Change(run_id, task.id, "throttled", 0, None, message, data)])
    return Outcome(_record(run_id, task.id, _T.QUEUED), again_in=again, reason=reason, throttled=True)


#: Seconds a refused task waits in its worker for a reserved token rather than re-queue.
SHORT_WAIT = 0.05


def _release(rt: Runtime, slot: str | None, task_id: str) -> None:
    if slot is not None:
        with contextlib.suppress(redis.RedisError):
            rt.slots.release(slot, holder=task_id)


def _run_handler(
    rt: Runtime,
    run_id: str,
    task: ManifestTask,
    attempt: int,
    base: int,
    inputs: dict[str, Any],
    slot: str | None,
    detached: bool,
) -> Outcome:
    """Run a claimed attempt's handler and store its outcome, under the attempt's lease.

    The heartbeat renews the lease until the outcome is stored, not only while the handler
    runs: a worker that waits for the store with a finished outcome still holds its task.
    """
    cancelled = CancelCheck(rt.redis, run_id)
    heartbeat = Heartbeat(
        rt.store,
        rt.slots if slot is not None else None,
        rt.redis,
        run_id=run_id,
        task_id=task.id,
        attempt=attempt,
        slot=slot,
        lease=rt.settings.lease_seconds,
        lost=cancelled.lost,
    )
    heartbeat.start()
    try:
        return _attempt(rt, run_id, task, attempt, base, inputs, cancelled, heartbeat, detached)
    finally:
        heartbeat.stop()


def _attempt(
    rt: Runtime,
    run_id: str,
    task: ManifestTask,
    attempt: int,
    base: int,
    inputs: dict[str, Any],
    cancelled: CancelCheck,
    heartbeat: Heartbeat,
    detached: bool,
) -> Outcome:
    masked = _Redacting()
    ctx = HandlerContext(
        run_id=run_id,
        task_id=task.id,
        attempt=attempt,
        max_attempts=task.retry.max_attempts,
        timeout=task.timeout,
        logger=masked.logger(f"taskexec.task.{task.handler}"),
        is_cancelled=cancelled,
        settings=rt.settings,
    )
    found: list[str] = []
    started = time.monotonic()

    def ignored_its_limit() -> None:  # the watchdog's record, just before it ends the process
        message = f"timed out after {task.timeout:g} s (the handler ignored its soft limit)"
        _failure(rt, run_id, task, attempt, base, _T.TIMED_OUT, message, ctx.metrics, started, detached)

    try:
        fn = resolve(task.handler, rt.settings)
        params, found = secrets.resolve(task.params, task.secret_params, allowed=rt.settings.secrets)
        masked.secrets = found
        try:
            with HandlerTimeLimit(task.timeout, HARD_LIMIT_GRACE, ignored_its_limit):
                raw = fn(params, inputs, ctx)
        finally:
            heartbeat.finishing()
        output = secrets.redact(check_output(raw, rt.settings.max_output_bytes), found)
    except HandlerNotAllowedError as e:
        return _end(rt, run_id, task, attempt, _T.ERROR, ErrorCode.HANDLER_NOT_ALLOWED, e.message, detached)
    except SoftTimeLimitExceeded:
        message = f"timed out after {task.timeout:g} s"
        return _failure(
            rt, run_id, task, attempt, base, _T.TIMED_OUT, message, ctx.metrics, started, detached
        )
    except AwaitApproval as e:
        return _await_approval(rt, run_id, task, attempt, e)
    except TaskCancelled:
        if cancelled.lost.is_set():
            return Outcome(_record(run_id, task.id, _current(rt, run_id, task.id)))
        return _end(
            rt, run_id, task, attempt, _T.CANCELLED, ErrorCode.CANCELLED, "cancelled while running", detached
        )
    except TaskFailed as e:
        message = secrets.redact(e.message, found)
        return _end(rt, run_id, task, attempt, _T.FAILED, e.code, message, detached)
    except RetryableError as e:
        message = secrets.redact(e.message, found)
        return _failure(rt, run_id, task, attempt, base, _T.FAILED, message, ctx.metrics, started, detached)
    except Exception as e:
        log.warning("handler %s of %s/%s raised %s", task.handler, run_id, task.id, type(e).__name__)
        message = secrets.redact(f"{type(e).__name__}: {e}", found)
        return _failure(rt, run_id, task, attempt, base, _T.ERROR, message, ctx.metrics, started, detached)
    metrics = {**ctx.metrics, "duration_seconds": round(time.monotonic() - started, 6)}
    to = _T.VALIDATING if task.validate_ else _T.SUCCEEDED

    def store_output(s: Session) -> tuple[repo.Change | None, bool]:
        repo.record_metrics(s, run_id, task.id, attempt, metrics)
        change = repo.set_task_status(
            s,
            run_id,
            task.id,
            to,
            allowed_from=[_T.RUNNING],
            attempt=attempt,
            output=output,
            lease_until=None,
        )
        return change, _cancelling(s, run_id)

    change, stopping = _patiently(rt, store_output)
    if change is None:  # cancelled, or taken over after this worker's lease ran out
        return Outcome(_record(run_id, task.id, _current(rt, run_id, task.id)))
    events.publish(rt.redis, [change])
    if to is _T.SUCCEEDED:
        return _settled(rt, run_id, task, to, detached, stopping=stopping)
    return Outcome(_record(run_id, task.id, to) | ({"detached": True} if detached else {}))


class _Redacting(logging.Filter):
    """Masks the task's secrets (and their encodings) in what its handler logs."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def logger(self, name: str) -> logging.Logger:
        """A logger of this attempt's own under ``name`` (not registered: nothing global
        changes), whose records pass through this filter, then to ``name``'s handlers."""
        parent = logging.getLogger(name)
        own = logging.Logger(name)
        own.parent = parent
        own.addFilter(self)
        return own

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = secrets.redact(record.getMessage(), self.secrets), None
            if record.exc_info:
                text = logging.Formatter().formatException(record.exc_info)
                record.exc_text, record.exc_info = secrets.redact(text, self.secrets), None
        return True


def _patiently(rt: Runtime, write: Callable[[Session], _W]) -> _W:
    """Store an attempt's outcome, retried while the store is down (``outcome_wait_seconds``).

    The handler has run: giving up here would run it again. Every write is conditioned on
    the attempt, so a transaction replayed after a commit whose reply was lost changes
    nothing the second time.
    """
    deadline = time.monotonic() + rt.settings.outcome_wait_seconds
    delay = 0.2
    while True:
        try:
            with rt.store.begin(wait=max(0.0, deadline - time.monotonic())) as s:
                return write(s)
        except DatabaseUnavailableError as e:
            if time.monotonic() >= deadline:
                raise
            log.warning("outcome not stored yet, the store is unavailable: %s", e.message)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _current(rt: Runtime, run_id: str, task_id: str) -> TaskStatus:
    with rt.store.begin() as s:
        return repo.task_state(s, run_id, task_id).status


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
            _maybe_stop(s, run_id, _T.ERROR)
    if change is None:
        return execute_again_later(rt, run_id, task.id)
    events.publish(rt.redis, [change])
    return _settled(rt, run_id, task, _T.ERROR, detached)


def _await_approval(
    rt: Runtime, run_id: str, task: ManifestTask, attempt: int, ask: AwaitApproval
) -> Outcome:
    """The task waits at an approval gate: no worker holds it; its chord part is done."""
    deadline = utcnow() + timedelta(seconds=ask.timeout) if ask.timeout else None
    change = _patiently(
        rt,
        lambda s: repo.set_task_status(
            s,
            run_id,
            task.id,
            _T.WAITING_APPROVAL,
            allowed_from=[_T.RUNNING],
            attempt=attempt,
            message=ask.message,
            not_before=deadline,
            lease_until=None,
            # What the decision is about, for status views; the decision replaces it.
            output={
                "approval": {"message": ask.message, "deadline": deadline.isoformat() if deadline else None}
            },
        ),
    )
    if change is None:
        return Outcome(_record(run_id, task.id, _current(rt, run_id, task.id)))
    events.publish(rt.redis, [change])
    return Outcome(_record(run_id, task.id, _T.WAITING_APPROVAL))


def _failure(
    rt: Runtime,
    run_id: str,
    task: ManifestTask,
    attempt: int,
    base: int,
    final: TaskStatus,
    message: str,
    metrics: dict[str, float] | None,
    started: float,
    detached: bool,
) -> Outcome:
    if metrics is not None:
        measured = {**metrics, "duration_seconds": round(time.monotonic() - started, 6)}
        _patiently(rt, lambda s: repo.record_metrics(s, run_id, task.id, attempt, measured))
    used = attempt - base  # attempts of this try (a rerun starts a new one)
    if used >= task.retry.max_attempts:
        return _end(rt, run_id, task, attempt, final, _code(final, used), message, detached)
    delay = task.retry.delay(used, random.Random())
    # Redis keeps countdown (ETA) messages in worker memory and delivers them again past the
    # visibility timeout: a backoff longer than half of it waits in the store instead.
    deferred = delay > rt.settings.visibility_timeout / 2
    change = _patiently(
        rt,
        lambda s: repo.set_task_status(
            s,
            run_id,
            task.id,
            _T.RETRYING,
            allowed_from=[_T.RUNNING, _T.VALIDATING],
            attempt=attempt,
            error_code=_code(final, used),
            message=f"attempt {attempt}: {message}",
            not_before=utcnow() + timedelta(seconds=delay),
            deferred=deferred,
            lease_until=None,
        ),
    )
    if change is None:
        return Outcome(_record(run_id, task.id, _current(rt, run_id, task.id)))
    events.publish(rt.redis, [change])
    if deferred:
        return Outcome(_record(run_id, task.id, _T.RETRYING))
    return Outcome(_record(run_id, task.id, _T.RETRYING), again_in=delay, reason=f"attempt {attempt} failed")


def _code(status: TaskStatus, attempt: int) -> ErrorCode:
    if status is _T.TIMED_OUT:
        return ErrorCode.TIMEOUT
    if status is _T.VALIDATION_FAILED:
        return ErrorCode.CRITERIA_NOT_MET
    return ErrorCode.RETRIES_EXHAUSTED if attempt > 1 else ErrorCode.EXECUTION_ERROR


def _maybe_stop(session: Any, run_id: str, status: TaskStatus) -> None:
    limit = compiled_run(session, run_id).manifest.stop.max_failures
    if status.failure and limit and repo.count_failures(session, run_id) >= limit:
        request_stop(session, run_id, "max_failures")


def _end(
    rt: Runtime,
    run_id: str,
    task: ManifestTask,
    attempt: int,
    status: TaskStatus,
    code: ErrorCode,
    message: str,
    detached: bool,
) -> Outcome:
    """Record a terminal failure, and stop the run when it reaches ``stop.max_failures``."""

    def store_end(s: Session) -> tuple[repo.Change | None, TaskStatus, bool, bool]:
        change = repo.set_task_status(
            s,
            run_id,
            task.id,
            status,
            # From running (the handler's outcome) or validating (the criteria's).
            allowed_from=[st for st in (_T.RUNNING, _T.VALIDATING) if st.can_become(status)],
            attempt=attempt,
            error_code=code,
            message=message,
            lease_until=None,
        )
        if change is None:
            return None, repo.task_state(s, run_id, task.id).status, False, False
        _maybe_stop(s, run_id, status)
        notify = status.failure and any(
            "task_failed" in n.events for n in compiled_run(s, run_id).manifest.notify
        )
        return change, status, notify, _cancelling(s, run_id)

    change, now_is, notify, stopping = _patiently(rt, store_end)
    if change is None:
        return Outcome(_record(run_id, task.id, now_is))
    events.publish(rt.redis, [change])
    if notify:
        send_notice(run_id, "task_failed", task.id)
    return _settled(rt, run_id, task, status, detached, stopping=stopping)


def _cancelling(session: Session, run_id: str) -> bool:
    """Whether the run is being cancelled (it then ends when its last running task does)."""
    return repo.stop_reason(session, run_id) == "cancelled"


def _settled(
    rt: Runtime,
    run_id: str,
    task: ManifestTask,
    status: TaskStatus,
    detached: bool,
    *,
    changed: bool = True,
    stopping: bool | None = None,
) -> Outcome:
    """After a task ended: end a stopping run, or, outside a chord, advance it.

    ``stopping`` (the run is being cancelled) when the caller read it with its last write.
    """
    faultpoints.reached("execute.settled")
    if stopping is None:
        with rt.store.begin() as s:
            stopping = _cancelling(s, run_id)
    if stopping and changed:
        # A cancelled run ends when its last running task does, without waiting for its
        # chord: revoked messages of the chord may come back only much later.
        finalize(rt.store, run_id, client=rt.redis)
    elif detached:
        from taskexec.celery_app import app

        release(app, rt.store, run_id, client=rt.redis)
    return Outcome(_record(run_id, task.id, status))


def validate(rt: Runtime, record: dict[str, Any]) -> Outcome:
    """One delivery of ``validate``: check a ``validating`` task's output against its criteria."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("run_id", "task_id")):
        raise RunNotFoundError(f"not a task record: {str(record)[:200]}", path="validate")
    run_id, task_id = record["run_id"], record["task_id"]
    detached = bool(record.get("detached"))
    if record.get("status") != _T.VALIDATING.value:
        return Outcome(record)
    with rt.store.begin() as s:
        task = compiled_run(s, run_id).tasks[task_id]
        row = results.task_result(s, run_id, task_id)
        base = repo.task_state(s, run_id, task_id).retry_base
    if row.status is not _T.VALIDATING:
        return Outcome(_record(run_id, task_id, row.status))
    try:
        verdicts = evaluate(task.validate_, row.output)
    except CriteriaError as e:
        return _end(rt, run_id, task, row.attempts, _T.ERROR, ErrorCode.CRITERIA_ERROR, e.message, detached)
    failed = [r.message for r in verdicts if not r.passed]
    if not failed:
        with rt.store.begin() as s:
            change = repo.set_task_status(
                s, run_id, task_id, _T.SUCCEEDED, allowed_from=[_T.VALIDATING], attempt=row.attempts
            )
            stopping = _cancelling(s, run_id)
        if change is None:
            return Outcome(_record(run_id, task_id, _current(rt, run_id, task_id)))
        events.publish(rt.redis, [change])
        return _settled(rt, run_id, task, _T.SUCCEEDED, detached, stopping=stopping)
    message = "output criteria not met: " + "; ".join(failed)
    return _failure(rt, run_id, task, row.attempts, base, _T.VALIDATION_FAILED, message, None, 0.0, detached)
