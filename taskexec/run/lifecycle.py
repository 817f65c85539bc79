"""How a run stops and ends: stop reasons, what is cancelled, skipped, and the final status.

A run ends only from the store: when every task has ended, or, for a run that was stopped
(cancel, ``max_failures``, run timeout), when every task has ended or was never started
(those are cancelled). An infrastructure failure never ends a run: the reconciler
carries it on. Once ended, a run's status stays (only ``taskexec retry`` reopens it).
"""

from __future__ import annotations

import logging

from redis import Redis, RedisError
from sqlalchemy.orm import Session

from taskexec.models import Change, ErrorCode, RunManifest, RunStatistics, RunStatus, TaskStatus
from taskexec.run import events
from taskexec.run.messages import send_notice
from taskexec.run.ratelimit import RateLimiter, bucket_key
from taskexec.services import Services
from taskexec.store import repository as repo
from taskexec.store import results
from taskexec.store.manifests import compiled_run
from taskexec.store.tables import Run, utcnow

__all__ = [
    "WAITING",
    "abandon",
    "finalize",
    "request_stop",
    "run_timed_out",
    "skip",
    "stage_settled",
    "stop_waiting",
]

log = logging.getLogger(__name__)

_T = TaskStatus

#: What a stopped run cancels: every task no worker holds (a running one ends by itself,
#: its handler told through ``ctx.is_cancelled()``).
WAITING = (_T.PENDING, _T.QUEUED, _T.RETRYING, _T.WAITING_APPROVAL)


def request_stop(session: Session, run_id: str, reason: str) -> bool:
    """Mark a run as stopping (``max_failures``, ``timeout``); true if this call did it."""
    return repo.set_stop_reason(session, run_id, reason)


def run_timed_out(run: Run, manifest: RunManifest) -> bool:
    """Whether a run has gone past its ``stop.timeout``."""
    limit = manifest.stop.timeout
    return bool(limit and run.started_at and (utcnow() - run.started_at).total_seconds() > limit)


def stop_waiting(session: Session, run_id: str, reason: str) -> list[Change]:
    """Cancel (E004) every task of a stopping run that no worker holds: the one way a stop
    takes effect, whoever asked for it (cancel, a stop condition, the reconciler)."""
    statuses = repo.task_statuses(session, run_id)
    return repo.set_tasks_status(
        session,
        run_id,
        [t for t, st in statuses.items() if st in WAITING],
        _T.CANCELLED,
        allowed_from=WAITING,
        error_code=ErrorCode.CANCELLED,
        message=f"run stopped: {reason}",
    )


def skip(session: Session, run_id: str, skipped: dict[str, list[str]]) -> list[Change]:
    """Skip (E009) pending tasks downstream of one that ended without success, by reason."""
    changes: list[Change] = []
    for why, ids in sorted(skipped.items()):
        changes += repo.set_tasks_status(
            session,
            run_id,
            ids,
            _T.SKIPPED,
            allowed_from=[_T.PENDING],
            error_code=ErrorCode.UPSTREAM_FAILED,
            message=why,
        )
    return changes


def stage_settled(session: Session, run_id: str, stage: int) -> bool:
    """Whether no task of ``stage`` has a message on its way or a worker on it.

    The rest of the stage has ended, waits for an approval, or is held behind one: the next
    stage may go (what depends on a held task is held in turn).
    """
    return not any(s.active for s in repo.task_statuses(session, run_id, stage).values())


def finalize(svc: Services, run_id: str) -> RunStatus | None:
    """End a run whose tasks have all ended; ``None`` when it is not over or already ended.

    A pending task of a run that was not stopped is work still to do (a dispatch that
    failed, a stage the reconciler has yet to send): the run is not over.
    """
    changes: list[Change] = []
    with svc.store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return None
        statuses = repo.task_statuses(s, run_id)
        if any(st.unsettled for st in statuses.values()):
            return None
        pending = any(st is _T.PENDING for st in statuses.values())
        if pending and run.stop_reason is None:
            return None
        if pending:
            changes += stop_waiting(s, run_id, run.stop_reason or "stopped")
        result = results.run_result(s, run_id)
        if run.stop_reason == "cancelled":
            final = RunStatus.CANCELLED
        elif run.stop_reason == "timeout":
            final = RunStatus.TIMED_OUT
        elif all(t.status is _T.SUCCEEDED for t in result.tasks):
            final = RunStatus.SUCCEEDED
        else:
            final = RunStatus.FAILED
        now = utcnow()
        started = run.started_at or run.submitted_at
        stats = RunStatistics.of(result.tasks, round((now - started).total_seconds(), 3))
        change = repo.set_run_status(
            s,
            run_id,
            final,
            message=run.stop_reason,
            statistics=stats.model_dump(mode="json"),
            error_message=None,
            finished_at=now,
        )
        if change is None:
            return None
        changes.append(change)
        manifest = compiled_run(s, run_id).manifest
        wants_notice = any("run_finished" in n.events for n in manifest.notify)
        stopped, tenant = run.stop_reason is not None, run.tenant
    events.publish(svc.redis, changes)
    if stopped and svc.redis is not None:
        _give_back_tokens(svc.redis, run_id, tenant, manifest)
    if wants_notice:
        send_notice(svc.app, run_id, "run_finished")
    return final


def abandon(svc: Services, run_id: str, reason: str) -> bool:
    """End a run that nothing can carry on: every unfinished task ``cancelled``, the run ``error``.

    Only the owner of a private fleet decides this (embedded mode, when its workers and its
    Redis are gone with the run's messages); a fleet's runs are never abandoned, the
    reconciler carries them on. Returns whether this call ended the run.
    """
    with svc.store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return False
        statuses = repo.task_statuses(s, run_id)
        unfinished = [t for t, st in statuses.items() if not st.terminal]
        changes = repo.set_tasks_status(
            s, run_id, unfinished, _T.CANCELLED, error_code=ErrorCode.CANCELLED, message=reason
        )
        result = results.run_result(s, run_id)
        now = utcnow()
        started = run.started_at or run.submitted_at
        stats = RunStatistics.of(result.tasks, round((now - started).total_seconds(), 3))
        change = repo.set_run_status(
            s,
            run_id,
            RunStatus.ERROR,
            message=reason,
            statistics=stats.model_dump(mode="json"),
            error_message=reason,
            finished_at=now,
        )
    events.publish(svc.redis, [*changes, *([change] if change else [])])
    return change is not None


def _give_back_tokens(redis: Redis, run_id: str, tenant: str | None, manifest: RunManifest) -> None:
    """Return the tokens its buckets reserved for a stopped run's tasks that waited in line.

    Those tasks will not come back for them (they were cancelled): other runs sharing a
    bucket would otherwise wait for tokens promised to nobody until the line forgets them.
    """
    limiter = RateLimiter(redis)
    for name, limit in manifest.rate_limits.items():
        key = bucket_key(name, limit, run_id=run_id, tenant=tenant)
        try:
            limiter.give_back(key, limit, run_id=run_id)
        except RedisError as e:  # they come back by themselves 30 s after their turn
            log.warning("tokens of run %s not given back to %s: %s", run_id, key, e)
