"""One claimed attempt of a task: run its handler, then store what came of it.

Outcomes of a handler call:

==========================  ==================  ===================================
handler                     attempts remain     attempts used up
==========================  ==================  ===================================
returns an object           ``succeeded`` (or ``validating`` when it has criteria)
``RetryableError``          ``retrying``        ``failed``: E005, or E003 after one attempt
other exception             ``retrying``        ``error``: E005, or E003 after one attempt
soft time limit             ``retrying``        ``timed_out``: E002
``HandlerTimedOut``         ``retrying``        ``timed_out``: E002
``TaskFailed``              ``failed`` at once (E003; E001 for bad params)
``TaskCancelled``           ``cancelled``: E004
handler not allowed         ``error``: E010 at once
==========================  ==================  ===================================

Every write is conditioned on the attempt (a worker that lost its claim writes nothing),
and is retried until the store takes it: the handler has run, giving up would run it again.
The heartbeat keeps the attempt's lease (in the store, and in Redis) until then.

The attempt's logs (what the handler printed through ``ctx.emit``, logged through
``ctx.logger``, and the exception it raised: :mod:`workers.capture`) are stored just before
its outcome, so that whoever sees the task's new status finds them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from taskexec.errors import (
    AwaitApproval,
    DatabaseUnavailableError,
    HandlerNotAllowedError,
    RetryableError,
    TaskCancelled,
    TaskFailed,
)
from taskexec.handlers import HandlerContext, HandlerTimedOut, check_output
from taskexec.models import Change, ErrorCode, ManifestTask, TaskStatus
from taskexec.run import events, faultpoints
from taskexec.run.dispatch import release
from taskexec.run.lifecycle import finalize, request_stop
from taskexec.run.messages import HARD_LIMIT_GRACE, send_notice
from taskexec.store import repository as repo
from taskexec.store.manifests import compiled_run
from taskexec.store.tables import utcnow
from workers import secrets
from workers.capture import LogCapture
from workers.handlers import BUILTINS, resolve
from workers.lease import CancelCheck, Heartbeat
from workers.runtime import Runtime
from workers.timelimit import HandlerTimeLimit

__all__ = ["Attempt", "Outcome", "current_status", "record", "settled"]

log = logging.getLogger("taskexec.worker")

_T = TaskStatus
_W = TypeVar("_W")


@dataclass(frozen=True)
class Outcome:
    """What Celery should do after a step: return ``record``, or come back in ``again_in`` s."""

    record: dict[str, Any]
    again_in: float | None = None
    #: Why the task comes back later, for Celery's retry log line and Flower.
    reason: str = ""


def record(run_id: str, task_id: str, status: TaskStatus) -> dict[str, Any]:
    """What a step returns to Celery: ids and a status only (a chord collects these)."""
    return {"run_id": run_id, "task_id": task_id, "status": status.value}


@dataclass(frozen=True)
class Attempt:
    """One attempt of a task: who runs it, which one it is, and how its run goes on after.

    ``base`` is the attempts spent before the current try (``taskexec retry`` starts a new
    one); ``detached`` is true for a message sent outside a stage's chord (the reconciler's,
    a long backoff's): when the task ends, this step itself moves the run on.
    """

    rt: Runtime
    run_id: str
    task: ManifestTask
    number: int
    base: int = 0
    detached: bool = False

    def run(self, inputs: dict[str, Any], slot: str | None) -> Outcome:
        """Run the handler and store its outcome, under the attempt's lease.

        The heartbeat renews the lease until the outcome is stored, not only while the
        handler runs: a worker that waits for the store with a finished outcome still
        holds its task.
        """
        rt = self.rt
        cancelled = CancelCheck(rt.redis, self.run_id)
        heartbeat = Heartbeat(
            rt.store,
            rt.slots if slot is not None else None,
            rt.redis,
            run_id=self.run_id,
            task_id=self.task.id,
            attempt=self.number,
            slot=slot,
            lease=rt.settings.lease_seconds,
            lost=cancelled.lost,
        )
        heartbeat.start()
        try:
            return self._run(inputs, cancelled, heartbeat)
        finally:
            heartbeat.stop()

    def _run(self, inputs: dict[str, Any], cancelled: CancelCheck, heartbeat: Heartbeat) -> Outcome:
        rt, task = self.rt, self.task
        masked = _Redacting()
        logs = LogCapture(self.run_id, task.id, self.number, limit=rt.settings.max_log_bytes, redis=rt.redis)
        ctx = HandlerContext(
            run_id=self.run_id,
            task_id=task.id,
            attempt=self.number,
            max_attempts=task.retry.max_attempts,
            timeout=task.timeout,
            logger=masked.logger(f"taskexec.task.{task.handler}", logs.handler()),
            is_cancelled=cancelled,
            settings=rt.settings,
            emit=logs.emit,
        )
        found: list[str] = []
        started = time.monotonic()
        # A built-in's exception says what went wrong in its message; another's traceback
        # shows where, in the operator's code.
        traced = task.handler not in BUILTINS

        def measured() -> dict[str, float]:
            return {**ctx.metrics, "duration_seconds": round(time.monotonic() - started, 6)}

        def ignored_its_limit() -> None:  # the watchdog's record, just before it ends the process
            message = f"timed out after {task.timeout:g} s (the handler ignored its soft limit)"
            logs.emit("error", message + "\n")
            self.keep(logs)
            self.failed(_T.TIMED_OUT, message, measured())

        # What to store once the attempt's logs are: the outcome's write, ready to call.
        then: Callable[[], Outcome]
        try:
            fn = resolve(task.handler, rt.settings)
            params, found = secrets.resolve(task.params, task.secret_params, allowed=rt.settings.secrets)
            masked.secrets = logs.secrets = found
            try:
                with HandlerTimeLimit(task.timeout, HARD_LIMIT_GRACE, ignored_its_limit):
                    raw = fn(params, inputs, ctx)
            finally:
                heartbeat.finishing()
            output = secrets.redact(check_output(raw, rt.settings.max_output_bytes), found)
            then = partial(self.succeeded, output, measured())
        except HandlerNotAllowedError as e:
            then = partial(self.ended, _T.ERROR, ErrorCode.HANDLER_NOT_ALLOWED, e.message)
        except SoftTimeLimitExceeded as e:
            message = f"timed out after {task.timeout:g} s"
            logs.raised(e, with_traceback=traced, message=message)
            then = partial(self.failed, _T.TIMED_OUT, message, measured())
        except AwaitApproval as e:
            then = partial(self.awaits_approval, e)
        except TaskCancelled:
            if cancelled.lost.is_set():
                then = partial(self.as_stored)
            else:
                then = partial(self.ended, _T.CANCELLED, ErrorCode.CANCELLED, "cancelled while running")
        except TaskFailed as e:
            logs.raised(e, with_traceback=traced)
            then = partial(self.ended, _T.FAILED, e.code, secrets.redact(e.message, found))
        except HandlerTimedOut as e:  # the handler's own limit: a timeout as the task's is
            logs.raised(e, with_traceback=traced)
            then = partial(self.failed, _T.TIMED_OUT, secrets.redact(e.message, found), measured())
        except RetryableError as e:
            logs.raised(e, with_traceback=traced)
            then = partial(self.failed, _T.FAILED, secrets.redact(e.message, found), measured())
        except Exception as e:
            log.warning("handler %s of %s/%s raised %s", task.handler, self.run_id, task.id, type(e).__name__)
            logs.raised(e, with_traceback=True)
            then = partial(
                self.failed, _T.ERROR, secrets.redact(f"{type(e).__name__}: {e}", found), measured()
            )
        self.keep(logs)
        return then()

    def as_stored(self) -> Outcome:
        """What Celery gets for an attempt that records nothing: the task's status as stored."""
        return Outcome(record(self.run_id, self.task.id, current_status(self.rt, self.run_id, self.task.id)))

    def keep(self, logs: LogCapture) -> None:
        """Store the attempt's logs, before its outcome (a follower that sees the task end
        finds them), retried as the outcome's write is. Logs never decide an outcome: a
        write that fails for another reason than the store's absence is logged and left."""
        streams = logs.close()
        if not streams:
            return
        try:
            patiently(
                self.rt, lambda s: repo.add_attempt_logs(s, self.run_id, self.task.id, self.number, streams)
            )
        except DatabaseUnavailableError:
            raise
        except Exception:
            log.exception("logs of %s/%s attempt %d not stored", self.run_id, self.task.id, self.number)

    def succeeded(self, output: dict[str, Any], metrics: dict[str, float]) -> Outcome:
        """Store the output: ``succeeded``, or ``validating`` when the task has criteria."""
        run_id, task = self.run_id, self.task
        to = _T.VALIDATING if task.validate_ else _T.SUCCEEDED

        def write(s: Session) -> tuple[Change | None, bool]:
            repo.record_metrics(s, run_id, task.id, self.number, metrics)
            change = repo.set_task_status(
                s,
                run_id,
                task.id,
                to,
                allowed_from=[_T.RUNNING],
                attempt=self.number,
                output=output,
                lease_until=None,
            )
            return change, _cancelling(s, run_id)

        change, stopping = patiently(self.rt, write)
        if change is None:  # cancelled, or taken over after this worker's lease ran out
            return Outcome(record(run_id, task.id, current_status(self.rt, run_id, task.id)))
        events.publish(self.rt.redis, [change])
        if to is _T.SUCCEEDED:
            return settled(self.rt, run_id, task, to, self.detached, stopping=stopping)
        return Outcome(record(run_id, task.id, to) | ({"detached": True} if self.detached else {}))

    def awaits_approval(self, ask: AwaitApproval) -> Outcome:
        """The task waits at an approval gate: no worker holds it; its chord part is done."""
        run_id, task = self.run_id, self.task
        deadline = utcnow() + timedelta(seconds=ask.timeout) if ask.timeout else None
        change = patiently(
            self.rt,
            lambda s: repo.set_task_status(
                s,
                run_id,
                task.id,
                _T.WAITING_APPROVAL,
                allowed_from=[_T.RUNNING],
                attempt=self.number,
                message=ask.message,
                not_before=deadline,
                lease_until=None,
                # What the decision is about, for status views; the decision replaces it.
                output={
                    "approval": {
                        "message": ask.message,
                        "deadline": deadline.isoformat() if deadline else None,
                    }
                },
            ),
        )
        if change is None:
            return Outcome(record(run_id, task.id, current_status(self.rt, run_id, task.id)))
        events.publish(self.rt.redis, [change])
        return Outcome(record(run_id, task.id, _T.WAITING_APPROVAL))

    def failed(self, final: TaskStatus, message: str, metrics: dict[str, float] | None) -> Outcome:
        """A failure of this attempt: ``retrying`` after a backoff while attempts remain, else
        ``final`` (failed, error, timed_out, validation_failed)."""
        rt, run_id, task = self.rt, self.run_id, self.task
        if metrics is not None:
            patiently(rt, lambda s: repo.record_metrics(s, run_id, task.id, self.number, metrics))
        used = self.number - self.base  # attempts of this try (a rerun starts a new one)
        if used >= task.retry.max_attempts:
            return self.ended(final, _code(final, used), message)
        delay = task.retry.delay(used, random.Random())
        # Redis keeps countdown (ETA) messages in worker memory and delivers them again past
        # the visibility timeout: a backoff longer than half of it waits in the store instead.
        deferred = delay > rt.settings.visibility_timeout / 2

        def write(s: Session) -> tuple[Change | None, str | None]:
            reason = repo.stop_reason(s, run_id)
            if reason is not None:  # the run is stopping: no retry would start, end it now
                return repo.set_task_status(
                    s,
                    run_id,
                    task.id,
                    _T.CANCELLED,
                    allowed_from=[_T.RUNNING, _T.VALIDATING],
                    attempt=self.number,
                    error_code=ErrorCode.CANCELLED,
                    message=f"run stopped: {reason}",
                    lease_until=None,
                ), reason
            return repo.set_task_status(
                s,
                run_id,
                task.id,
                _T.RETRYING,
                allowed_from=[_T.RUNNING, _T.VALIDATING],
                attempt=self.number,
                error_code=_code(final, used),
                message=f"attempt {self.number}: {message}",
                not_before=utcnow() + timedelta(seconds=delay),
                deferred=deferred,
                lease_until=None,
            ), None

        change, stopped = patiently(rt, write)
        if change is None:
            return Outcome(record(run_id, task.id, current_status(rt, run_id, task.id)))
        events.publish(rt.redis, [change])
        if stopped is not None:
            return settled(rt, run_id, task, _T.CANCELLED, self.detached, stopping=stopped == "cancelled")
        if deferred:
            return Outcome(record(run_id, task.id, _T.RETRYING))
        return Outcome(
            record(run_id, task.id, _T.RETRYING), again_in=delay, reason=f"attempt {self.number} failed"
        )

    def ended(self, status: TaskStatus, code: ErrorCode, message: str) -> Outcome:
        """Record a terminal failure, and stop the run when it reaches ``stop.max_failures``."""
        rt, run_id, task = self.rt, self.run_id, self.task

        def write(s: Session) -> tuple[Change | None, TaskStatus, bool, bool]:
            change = repo.set_task_status(
                s,
                run_id,
                task.id,
                status,
                # From running (the handler's outcome) or validating (the criteria's).
                allowed_from=[st for st in (_T.RUNNING, _T.VALIDATING) if st.can_become(status)],
                attempt=self.number,
                error_code=code,
                message=message,
                lease_until=None,
            )
            if change is None:
                return None, repo.task_state(s, run_id, task.id).status, False, False
            maybe_stop(s, run_id, status)
            notify = status.failure and any(
                "task_failed" in n.events for n in compiled_run(s, run_id).manifest.notify
            )
            return change, status, notify, _cancelling(s, run_id)

        change, now_is, notify, stopping = patiently(rt, write)
        if change is None:
            return Outcome(record(run_id, task.id, now_is))
        events.publish(rt.redis, [change])
        if notify:
            send_notice(rt.services.app, run_id, "task_failed", task.id)
        return settled(rt, run_id, task, status, self.detached, stopping=stopping)


def _code(status: TaskStatus, attempt: int) -> ErrorCode:
    if status is _T.TIMED_OUT:
        return ErrorCode.TIMEOUT
    if status is _T.VALIDATION_FAILED:
        return ErrorCode.CRITERIA_NOT_MET
    return ErrorCode.RETRIES_EXHAUSTED if attempt > 1 else ErrorCode.EXECUTION_ERROR


def maybe_stop(session: Session, run_id: str, status: TaskStatus) -> None:
    """Stop the run (``max_failures``) when this failure reaches its limit."""
    limit = compiled_run(session, run_id).manifest.stop.max_failures
    if status.failure and limit and repo.count_failures(session, run_id) >= limit:
        request_stop(session, run_id, "max_failures")


def _cancelling(session: Session, run_id: str) -> bool:
    """Whether the run is being cancelled (it then ends when its last running task does)."""
    return repo.stop_reason(session, run_id) == "cancelled"


def current_status(rt: Runtime, run_id: str, task_id: str) -> TaskStatus:
    """The task's status in the store, now."""
    with rt.store.begin() as s:
        return repo.task_state(s, run_id, task_id).status


def settled(
    rt: Runtime,
    run_id: str,
    task: ManifestTask,
    status: TaskStatus,
    detached: bool,
    *,
    changed: bool = True,
    stopping: bool | None = None,
) -> Outcome:
    """After a task ended: end a stopping run, or, outside a chord, move the run on.

    ``stopping`` (the run is being cancelled) when the caller read it with its last write.
    """
    faultpoints.reached("execute.settled")
    if stopping is None:
        with rt.store.begin() as s:
            stopping = _cancelling(s, run_id)
    if stopping and changed:
        # A cancelled run ends when its last running task does, without waiting for its
        # chord: revoked messages of the chord may come back only much later.
        finalize(rt.services, run_id)
    elif detached:
        release(rt.services, run_id)
    return Outcome(record(run_id, task.id, status))


def patiently(rt: Runtime, write: Callable[[Session], _W]) -> _W:
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


class _Redacting(logging.Filter):
    """Masks the task's secrets (and their encodings) in what its handler logs."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def logger(self, name: str, capture: logging.Handler | None = None) -> logging.Logger:
        """A logger of this attempt's own under ``name`` (not registered: nothing global
        changes), whose records pass through this filter, then to ``name``'s handlers.

        With ``capture``, records from INFO up also go to it (the attempt's logs), whatever
        the worker's level; ``name``'s handlers still get only what its level lets through.
        """
        own = logging.Logger(name)
        parent = own.parent = logging.getLogger(name)
        own.addFilter(self)
        if capture is not None:
            own.setLevel(min(logging.INFO, parent.getEffectiveLevel()))
            own.propagate = False
            own.addHandler(capture)
            own.addHandler(_ToParent(parent))
        return own

    def filter(self, entry: logging.LogRecord) -> bool:
        if self.secrets:
            entry.msg, entry.args = secrets.redact(entry.getMessage(), self.secrets), None
            if entry.exc_info:
                text = logging.Formatter().formatException(entry.exc_info)
                entry.exc_text, entry.exc_info = secrets.redact(text, self.secrets), None
        return True


class _ToParent(logging.Handler):
    """Hands a record on to a logger as if it had been logged there (its level applies)."""

    def __init__(self, parent: logging.Logger) -> None:
        super().__init__()
        self.parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        if self.parent.isEnabledFor(record.levelno):
            self.parent.handle(record)
