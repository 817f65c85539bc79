"""Celery tasks: thin adapters from messages (ids only) to :mod:`workers.runner`.

``execute`` runs on the ``executor`` queue, ``validate`` on ``validator``; ``dispatch``,
``advance``, ``stage_failed`` and ``reconcile`` on ``control``. Header tasks of a stage's
chord never raise for a business failure (the outcome is in the store), so the chord
body always runs; an exception that escapes is an infrastructure failure and reaches
``stage_failed``, which records it on the run: the run goes on, and the reconciler
carries it past what the failure left behind. Waits that are not failures (a rate-limit
token, a concurrency slot, another copy's lease, a backoff) are Celery retries: the
message goes back to the broker with a countdown and holds no worker slot, the chord
keeps counting it as one part, and the store holds its due time (if the worker holding
the delayed message dies, the reconciler sends the task again).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import redis
from celery import Task
from celery.exceptions import ChordError, TaskRevokedError
from celery.signals import worker_process_init
from redis.exceptions import LockError

from taskexec.celery_app import app
from taskexec.errors import DatabaseUnavailableError, RunNotFoundError, Throttled
from taskexec.run import faultpoints
from taskexec.run.dispatch import dispatch, release
from taskexec.run.lifecycle import stage_settled
from taskexec.run.messages import execute_signature
from taskexec.run.reconcile import LOCK, reconcile
from taskexec.settings import Settings
from taskexec.store import repository as repo
from taskexec.store.manifests import compiled_run
from workers import runner
from workers.attempt import Outcome
from workers.runtime import Runtime

__all__ = [
    "advance",
    "dispatch_stage",
    "execute",
    "reconcile_fleet",
    "release_held",
    "stage_failed",
    "validate",
]

log = logging.getLogger("taskexec.worker")

_runtime: Runtime | None = None

#: Countdown of a step retried because the result store was unreachable.
STORE_RETRY_SECONDS = 5.0


def runtime() -> Runtime:
    """This process's runtime, created on first use (after the prefork pool forked)."""
    global _runtime  # noqa: PLW0603 - one per process by design
    if _runtime is None:
        settings: Settings = app.conf.taskexec_settings
        _runtime = Runtime.create(settings, app)
    return _runtime


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # A forked child must not reuse the parent's pooled connections: drop them.
    if _runtime is not None:
        _runtime.store.dispose()


def _again(task: Task, outcome: Outcome) -> None:
    """Re-queue this message per the outcome (never counts against Celery's max_retries)."""
    assert outcome.again_in is not None
    faultpoints.reached("execute.delayed")
    raise task.retry(
        countdown=outcome.again_in,
        max_retries=None,
        exc=Throttled(outcome.reason),
        argsrepr=task.request.argsrepr,  # a retry is a new message: keep the ids-only view
    )


@app.task(name="taskexec.execute", bind=True, max_retries=None, acks_late=True)
def execute(self: Task, run_id: str, task_id: str, detached: bool = False) -> dict[str, Any]:
    """Run one attempt of a task, or wait (re-queued) until it may run."""
    try:
        outcome = runner.execute(runtime(), run_id, task_id, detached=detached)
    except RunNotFoundError as e:
        # A message about a run the store does not know (deleted, another fleet's, forged):
        # nothing to do; acknowledged so that it is not delivered again.
        log.warning("execute %r/%r refused: %s", run_id, task_id, e)
        return {"run_id": run_id, "task_id": task_id, "status": "unknown"}
    except (DatabaseUnavailableError, redis.ConnectionError, redis.TimeoutError) as e:
        # The store rode out what it could; the message comes back later, state decides then.
        log.warning("execute %s/%s: %s; retrying in %g s", run_id, task_id, e, STORE_RETRY_SECONDS)
        again = {"countdown": STORE_RETRY_SECONDS, "max_retries": None, "argsrepr": self.request.argsrepr}
        raise self.retry(exc=e, **again) from e
    if outcome.again_in is not None:
        _again(self, outcome)
    return outcome.record


@app.task(name="taskexec.validate", bind=True, max_retries=None, acks_late=True)
def validate(self: Task, record: dict[str, Any]) -> dict[str, Any]:
    """Check a task's output against its criteria; re-execute it while attempts remain."""
    try:
        outcome = runner.validate(runtime(), record)
    except RunNotFoundError as e:
        log.warning("validate refused: %s", e)
        return {"status": "unknown"}
    except (DatabaseUnavailableError, redis.ConnectionError, redis.TimeoutError) as e:
        raise self.retry(countdown=STORE_RETRY_SECONDS, max_retries=None, exc=e) from e
    if outcome.again_in is not None:
        # Task.replace keeps the chord membership of this header element.
        run_id, task_id = record["run_id"], record["task_id"]
        with runtime().store.begin() as s:
            task = compiled_run(s, run_id).tasks[task_id]
        again = execute_signature(
            app, run_id, task, detached=bool(record.get("detached")), countdown=outcome.again_in
        )
        faultpoints.reached("validate.delayed")
        raise self.replace(again)
    return outcome.record


@app.task(name="taskexec.dispatch", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def dispatch_stage(self: Task, run_id: str, stage: int) -> None:
    """Dispatch a stage the producer asked for: stage 0 of a new run, or a resumed one."""
    rt = runtime()
    try:
        dispatch(rt.services, run_id, stage)
    except DatabaseUnavailableError as e:
        raise self.retry(countdown=STORE_RETRY_SECONDS, max_retries=None, exc=e) from e


@app.task(name="taskexec.advance", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def advance(self: Task, run_id: str, stage: int) -> None:
    """Chord body of stage ``stage - 1``: dispatch ``stage`` once the previous one is complete.

    The body runs when every header part has returned once. The store has the last word:
    a part whose task waits in the store (a deferred backoff) lets the body run early, and
    then the task's own detached delivery dispatches the next stage when it ends.
    """
    rt = runtime()
    try:
        with rt.store.begin() as s:
            settled = stage_settled(s, run_id, stage - 1)
        if settled:
            dispatch(rt.services, run_id, stage)
    except DatabaseUnavailableError as e:
        raise self.retry(countdown=STORE_RETRY_SECONDS, max_retries=None, exc=e) from e


@app.task(name="taskexec.release", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def release_held(self: Task, run_id: str) -> None:
    """Dispatch held tasks now free to run (after an approval or a retry); else go on or end."""
    rt = runtime()
    try:
        release(rt.services, run_id)
    except DatabaseUnavailableError as e:
        raise self.retry(countdown=STORE_RETRY_SECONDS, max_retries=None, exc=e) from e


@app.task(name="taskexec.stage_failed", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def stage_failed(self: Task, run_id: str, stage: int) -> None:
    """Error callback of a stage's chord: a part raised, so its body will not run.

    Nothing is lost: every task's state is in the store. The failure is recorded on the
    run, which stays ``running``; the reconciler finds the stage settled in the store and
    dispatches what comes next, and takes over any task the failure left running.

    A run that is stopping (a cancel, say) revoked its queued messages, and a revoked part
    fails its chord: that is how a stop ends a chord, logged at INFO, no incident recorded.
    """
    rt = runtime()
    what = "a batch of released tasks" if stage < 0 else f"stage {stage}"
    message = f"the chord of {what} failed in the infrastructure; the reconciler carries the run on"
    try:
        with rt.store.begin() as s:
            reason = repo.stop_reason(s, run_id)
            if reason is None:
                repo.record_incident(s, run_id, message)
    except DatabaseUnavailableError as e:
        log.error("run %s: %s (the store is unreachable: recorded later)", run_id, message)
        raise self.retry(countdown=STORE_RETRY_SECONDS, exc=e) from e
    if reason is None:
        log.error("run %s: %s", run_id, message)
        return
    verb = "cancel" if reason == "cancelled" else f"stop ({reason})"
    log.info("run %s: the chord of %s ended by its %s (revoked messages)", run_id, what, verb)


def _revoked_part(exc: BaseException | None) -> bool:
    """A chord error caused by a revoked header task: the run was cancelled."""
    if exc is None:
        return False
    if isinstance(exc, TaskRevokedError) or isinstance(exc.__cause__, TaskRevokedError):
        return True
    return isinstance(exc, ChordError) and "TaskRevokedError(" in str(exc)


class _RevokedChordIsNoError(logging.Filter):
    """Celery's result backend logs a chord failed by a revoked part as an ERROR with the
    ChordError's traceback. Only a cancel revokes taskexec's messages: INFO, no traceback.
    Any other chord failure stays as Celery logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and _revoked_part(record.exc_info[1]):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.msg} (a revoked message: the run was cancelled)"
        return True


for _name in ("celery.backends.redis", "celery.backends.base"):
    logging.getLogger(_name).addFilter(_RevokedChordIsNoError())


@app.task(name="taskexec.reconcile", ignore_result=True)
def reconcile_fleet() -> None:
    """One round of the reconciler, if no other round is running anywhere in the fleet."""
    rt = runtime()
    if rt.redis is None:
        return
    settings = rt.settings
    # A round whose worker died frees the lock after four intervals; a round that outlasts it
    # may overlap the next one, which is harmless (every action is idempotent).
    lock = rt.redis.lock(LOCK, timeout=max(5.0, settings.reconcile_interval * 4), blocking=False)
    if not lock.acquire():
        return
    try:
        reconcile(rt.services, grace=settings.resend_grace)
    finally:
        with contextlib.suppress(LockError):  # a round longer than the lock's timeout
            lock.release()
