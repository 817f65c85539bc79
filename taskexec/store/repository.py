"""Reads and writes of the result store. Every function takes a Session and never commits.

State changes are conditional UPDATEs (``... WHERE status IN (allowed predecessors)``):
a duplicate delivery of a message, or two workers racing, changes a row at most once,
and each change that happened writes one ``execution_logs`` row. The caller frames the
transaction (``with store.begin() as session``) and publishes messages only after it
commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from taskexec.errors import IllegalTransitionError, RunNotFoundError
from taskexec.models import (
    RUN_TRANSITIONS,
    TASK_TRANSITIONS,
    ErrorCode,
    RunManifest,
    RunStatus,
    TaskStatus,
)
from taskexec.store.tables import Execution, ExecutionLog, ExecutionMetric, Run, utcnow

# The hot path (claims, status changes, metrics: a few statements per task) runs Core
# statements on the tables: the ORM's bulk-DML layer costs more than the statements do.
_executions = cast(Table, Execution.__table__)
_logs = cast(Table, ExecutionLog.__table__)
_metrics = cast(Table, ExecutionMetric.__table__)
_runs = cast(Table, Run.__table__)

__all__ = [
    "Change",
    "add_run",
    "TaskState",
    "claim_attempt",
    "Overdue",
    "bump_epoch",
    "claim_stage",
    "clear_outbox",
    "lost_tasks",
    "mark_outbox",
    "mark_resent",
    "overdue_tasks",
    "set_due",
    "count_failures",
    "count_throttled",
    "get_run",
    "load_manifest",
    "log_line",
    "outputs_of",
    "record_incident",
    "record_metrics",
    "renew_lease",
    "reopen_tasks",
    "set_run_status",
    "set_task_status",
    "set_tasks_status",
    "task_state",
    "task_statuses",
]

#: A task in one of these has a message on its way or a worker on it.
ACTIVE = (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING, TaskStatus.VALIDATING)
#: Not over yet: active, or waiting for a person's decision (no message, no worker).
UNSETTLED = (*ACTIVE, TaskStatus.WAITING_APPROVAL)


@dataclass(frozen=True)
class Change:
    """A status change that happened: published as a run event after commit."""

    run_id: str
    task_id: str | None
    status: str
    attempt: int = 0
    error_code: str | None = None
    message: str | None = None
    #: Structured details for consumers of events (a throttled wait's limit and seconds).
    data: dict[str, Any] | None = None


def _predecessors(to: TaskStatus, allowed_from: Iterable[TaskStatus] | None) -> list[str]:
    legal = {s for s, nxt in TASK_TRANSITIONS.items() if to in nxt}
    if allowed_from is not None:
        wanted = set(allowed_from)
        if not wanted <= legal:
            bad = ", ".join(sorted(s.value for s in wanted - legal))
            raise IllegalTransitionError(f"a task cannot go from {bad} to {to.value}")
        legal = wanted
    return sorted(s.value for s in legal)


def add_run(
    session: Session,
    run_id: str,
    manifest: RunManifest,
    *,
    tenant: str | None = None,
    labels: dict[str, str] | None = None,
    now: datetime | None = None,
) -> None:
    """Insert a run and one ``pending`` execution row per task (executemany)."""
    now = now or utcnow()
    session.add(
        Run(
            run_id=run_id,
            plan_id=manifest.plan_id,
            plan_name=manifest.plan_name,
            variant=manifest.variant,
            status=RunStatus.QUEUED.value,
            manifest=manifest.model_dump(mode="json"),
            statistics=None,
            tenant=tenant,
            labels=labels or {},
            stage_count=len(manifest.stages),
            stage_cursor=-1,
            epoch=0,
            submitted_at=now,
            updated_at=now,
        )
    )
    session.flush()
    session.execute(
        insert(Execution),
        [
            {
                "run_id": run_id,
                "task_id": t.id,
                "stage": t.stage,
                "status": TaskStatus.PENDING.value,
                "attempts": 0,
                "updated_at": now,
            }
            for t in manifest.tasks
        ],
    )
    session.execute(
        insert(ExecutionLog),
        [
            {
                "run_id": run_id,
                "task_id": None,
                "attempt": 0,
                "event": "transition",
                "from_status": None,
                "to_status": RunStatus.QUEUED.value,
                "message": f"submitted: {len(manifest.tasks)} tasks in {len(manifest.stages)} stages",
                "at": now,
            }
        ],
    )


def get_run(session: Session, run_id: str, *, for_update: bool = False) -> Run:
    """The run row; :class:`RunNotFoundError` when there is none."""
    stmt = select(Run).where(Run.run_id == run_id)
    if for_update:
        stmt = stmt.with_for_update()
    run = session.scalars(stmt).one_or_none()
    if run is None:
        raise RunNotFoundError(f"no run {run_id!r} in the store", path="RUN")
    return run


def stop_reason(session: Session, run_id: str) -> str | None:
    """Why the run is stopping (``cancelled``, ``max_failures``, ``timeout``), or ``None``."""
    reason: str | None = session.scalar(select(_runs.c.stop_reason).where(_runs.c.run_id == run_id))
    return reason


def load_manifest(run: Run) -> RunManifest:
    """The manifest stored with a run."""
    return RunManifest.model_validate(run.manifest)


def set_tasks_status(
    session: Session,
    run_id: str,
    task_ids: Sequence[str],
    to: TaskStatus,
    *,
    allowed_from: Iterable[TaskStatus] | None = None,
    error_code: ErrorCode | None = None,
    message: str | None = None,
    now: datetime | None = None,
    attempt: int | None = None,
    **fields: Any,
) -> list[Change]:
    """Move every listed task that may legally do so to ``to``; the changes that happened.

    With ``attempt``, only a task still on that attempt moves: a worker that lost its
    claim (taken over after its lease ran out) writes nothing.
    """
    if not task_ids:
        return []
    now = now or utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now, **fields}
    if error_code is not None or to.terminal:
        values.setdefault("error_code", error_code.value if error_code else None)
        values.setdefault("error_message", message if error_code else None)
    if to.terminal:
        values.setdefault("finished_at", now)
    changed: list[tuple[str, str, int]] = []
    for chunk in _chunks(task_ids, 500):
        stmt = (
            update(_executions)
            .where(
                _executions.c.run_id == run_id,
                _executions.c.task_id.in_(chunk),
                _executions.c.status.in_(_predecessors(to, allowed_from)),
                *([_executions.c.attempts == attempt] if attempt is not None else []),
            )
            .values(**values)
            .returning(_executions.c.task_id, _executions.c.attempts, _executions.c.worker)
        )
        changed.extend((r[0], r[2] or "", r[1]) for r in session.execute(stmt))
    if changed:
        session.execute(
            insert(_logs),
            [
                {
                    "run_id": run_id,
                    "task_id": tid,
                    "attempt": attempt,
                    "event": "transition",
                    "to_status": to.value,
                    "error_code": error_code.value if error_code else None,
                    "message": message,
                    "worker": worker or None,
                    "at": now,
                }
                for tid, worker, attempt in changed
            ],
        )
    code = error_code.value if error_code else None
    return [Change(run_id, tid, to.value, attempt, code, message) for tid, _, attempt in changed]


def set_task_status(
    session: Session,
    run_id: str,
    task_id: str,
    to: TaskStatus,
    *,
    allowed_from: Iterable[TaskStatus] | None = None,
    error_code: ErrorCode | None = None,
    message: str | None = None,
    attempt: int | None = None,
    **fields: Any,
) -> Change | None:
    """Move one task to ``to`` if it may; the change, or ``None`` when it did not happen."""
    changes = set_tasks_status(
        session,
        run_id,
        [task_id],
        to,
        allowed_from=allowed_from,
        error_code=error_code,
        message=message,
        attempt=attempt,
        **fields,
    )
    return changes[0] if changes else None


@dataclass(frozen=True)
class TaskState:
    """What a worker needs to know of a task's row before it runs it."""

    status: TaskStatus
    attempts: int
    worker: str | None
    lease_until: datetime | None
    not_before: datetime | None
    deferred: bool
    retry_base: int = 0
    #: The run's ``stop_reason`` and ``tenant``, read with the task (one query, not two).
    stop_reason: str | None = None
    tenant: str | None = None

    @property
    def used(self) -> int:
        """Attempts spent in the current try (``taskexec retry`` starts a new one)."""
        return self.attempts - self.retry_base


def task_state(session: Session, run_id: str, task_id: str) -> TaskState:
    """A task's status, attempts, lease and due time, with its run's stop reason and tenant.

    Raises:
        RunNotFoundError: No such run, or no such task in it.
    """
    row = session.execute(
        select(
            _executions.c.status,
            _executions.c.attempts,
            _executions.c.worker,
            _executions.c.lease_until,
            _executions.c.not_before,
            _executions.c.deferred,
            _executions.c.retry_base,
            _runs.c.stop_reason,
            _runs.c.tenant,
        )
        .join(_runs, _runs.c.run_id == _executions.c.run_id)
        .where(_executions.c.run_id == run_id, _executions.c.task_id == task_id)
    ).one_or_none()
    if row is None:
        get_run(session, run_id)  # raises when the run itself is missing
        raise RunNotFoundError(f"no task {task_id!r} in run {run_id!r}", path="TASK")
    status, attempts, worker, lease_until, not_before, deferred, base, reason, tenant = row
    return TaskState(
        TaskStatus(status),
        attempts,
        worker,
        lease_until,
        not_before,
        bool(deferred),
        base or 0,
        stop_reason=reason,
        tenant=tenant,
    )


def claim_attempt(
    session: Session,
    run_id: str,
    task_id: str,
    worker: str,
    *,
    lease_until: datetime,
    takeover_from: int | None = None,
    now: datetime | None = None,
) -> int | None:
    """Start the next attempt of a task: ``running``, attempts + 1, leased to ``worker``.

    A task is claimable when it is ``queued``, or ``retrying`` and due. With
    ``takeover_from`` (the attempt number the caller saw), a ``running`` task whose lease
    has run out is claimable too: its worker was lost. One conditional UPDATE decides, so
    of two deliveries of the same message at most one gets the attempt.

    Returns the attempt number, or ``None`` when the task was not there to be claimed.
    """
    now = now or utcnow()
    claimable = or_(
        _executions.c.status == TaskStatus.QUEUED.value,
        and_(
            _executions.c.status == TaskStatus.RETRYING.value,
            or_(_executions.c.not_before.is_(None), _executions.c.not_before <= now),
        ),
    )
    if takeover_from is not None:
        claimable = or_(
            claimable,
            and_(
                _executions.c.status == TaskStatus.RUNNING.value,
                _executions.c.attempts == takeover_from,
                or_(_executions.c.lease_until.is_(None), _executions.c.lease_until < now),
            ),
        )
    stmt = (
        update(_executions)
        .where(_executions.c.run_id == run_id, _executions.c.task_id == task_id, claimable)
        .values(
            status=TaskStatus.RUNNING.value,
            attempts=_executions.c.attempts + 1,
            worker=worker,
            lease_until=lease_until,
            not_before=None,
            deferred=False,
            started_at=func.coalesce(_executions.c.started_at, now),
            updated_at=now,
        )
        .returning(_executions.c.attempts)
    )
    attempt = session.execute(stmt).scalar_one_or_none()
    if attempt is not None:
        session.execute(
            insert(_logs).values(
                run_id=run_id,
                task_id=task_id,
                attempt=attempt,
                event="transition",
                to_status=TaskStatus.RUNNING.value,
                message="taken over: the worker of the previous attempt was lost" if takeover_from else None,
                worker=worker,
                at=now,
            )
        )
    return attempt


def renew_lease(session: Session, run_id: str, task_id: str, attempt: int, until: datetime) -> bool:
    """Extend the lease of a running attempt; false when the attempt no longer holds the task."""
    stmt = (
        update(Execution)
        .where(
            Execution.run_id == run_id,
            Execution.task_id == task_id,
            Execution.attempts == attempt,
            Execution.status == TaskStatus.RUNNING.value,
        )
        .values(lease_until=until)
    )
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def reopen_tasks(session: Session, run_id: str, task_ids: Sequence[str], *, message: str) -> list[Change]:
    """Tasks that ended without success back to pending, each with a fresh budget of attempts."""
    changes = set_tasks_status(
        session,
        run_id,
        task_ids,
        TaskStatus.PENDING,
        allowed_from=[
            TaskStatus.FAILED,
            TaskStatus.VALIDATION_FAILED,
            TaskStatus.TIMED_OUT,
            TaskStatus.ERROR,
            TaskStatus.CANCELLED,
            TaskStatus.SKIPPED,
        ],
        message=message,
        retry_base=Execution.attempts,
        error_message=None,
        output=None,
        finished_at=None,
        not_before=None,
        deferred=False,
        lease_until=None,
    )
    # error_code is set_tasks_status's own argument (None there means "leave it"): clear it here.
    reopened = [c.task_id for c in changes if c.task_id is not None]
    for chunk in _chunks(reopened, 500):
        session.execute(
            update(Execution)
            .where(Execution.run_id == run_id, Execution.task_id.in_(chunk))
            .values(error_code=None)
        )
    return changes


def count_throttled(session: Session, run_id: str, task_id: str, *, due: datetime | None = None) -> None:
    """Count one wait of a task for a rate-limit token or a concurrency slot, due at ``due``.

    The due time is the delayed message's: it waits in a worker's memory, and the
    reconciler sends the task again if it is still waiting well past it (that worker died).
    """
    values: dict[str, Any] = {"throttled": _executions.c.throttled + 1}
    if due is not None:
        values["not_before"] = due
    session.execute(
        update(_executions)
        .where(
            _executions.c.run_id == run_id,
            _executions.c.task_id == task_id,
            _executions.c.status.in_([TaskStatus.QUEUED.value, TaskStatus.RETRYING.value]),
        )
        .values(**values)
    )


def clear_outbox(session: Session, run_id: str, token: str) -> int:
    """Mark the messages of one dispatch (``token``) as sent; how many rows it cleared."""
    stmt = (
        update(_executions)
        .where(_executions.c.run_id == run_id, _executions.c.outbox == token)
        .values(outbox=None)
    )
    return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def set_due(session: Session, run_id: str, due: dict[str, datetime]) -> None:
    """Record when each listed task's delayed message is due (a paced ETA): executemany."""
    if due:
        session.execute(
            update(_executions)
            .where(_executions.c.run_id == run_id, _executions.c.task_id == bindparam("tid"))
            .values(not_before=bindparam("due")),
            [{"tid": tid, "due": at} for tid, at in due.items()],
        )


def mark_outbox(session: Session, run_id: str, task_ids: Sequence[str], token: str) -> None:
    """Put queued tasks (being sent again) back in the outbox under ``token``."""
    for chunk in _chunks(task_ids, 500):
        session.execute(
            update(_executions)
            .where(
                _executions.c.run_id == run_id,
                _executions.c.task_id.in_(chunk),
                _executions.c.status == TaskStatus.QUEUED.value,
            )
            .values(outbox=token)
        )


@dataclass(frozen=True)
class Overdue:
    """A task whose message is overdue or was never sent, as the reconciler found it."""

    run_id: str
    task_id: str
    status: str
    not_before: datetime | None
    outbox: str | None


def overdue_tasks(session: Session, *, now: datetime, late: datetime, limit: int = 10_000) -> list[Overdue]:
    """Tasks of running runs whose message no worker will deliver without help.

    A deferred backoff that is due (no message carries it); a delayed message (backoff,
    token or slot wait, paced ETA) due before ``late`` (the worker holding it died); a row
    still in the outbox since before ``late`` (its dispatcher never sent it; the caller
    skips those whose publisher is still at work).
    """
    ex = _executions
    rows = session.execute(
        select(ex.c.run_id, ex.c.task_id, ex.c.status, ex.c.not_before, ex.c.outbox)
        .join(_runs, _runs.c.run_id == ex.c.run_id)
        .where(
            _runs.c.status == RunStatus.RUNNING.value,
            or_(
                and_(
                    ex.c.status == TaskStatus.RETRYING.value, ex.c.deferred.is_(True), ex.c.not_before <= now
                ),
                and_(
                    ex.c.status.in_([TaskStatus.RETRYING.value, TaskStatus.QUEUED.value]),
                    ex.c.deferred.is_(False),
                    ex.c.not_before < late,
                ),
                and_(
                    ex.c.status.in_([TaskStatus.QUEUED.value, TaskStatus.RETRYING.value]),
                    ex.c.outbox.is_not(None),
                    ex.c.updated_at < late,
                ),
            ),
        )
        .limit(limit)
    )
    return [Overdue(*row) for row in rows]


def mark_resent(session: Session, tasks: Sequence[Overdue], token: str) -> list[str]:
    """Put overdue tasks in the outbox under ``token``, each unless its row changed since it
    was found; the ids of those marked (the caller sends those)."""
    ex = _executions
    now = utcnow()
    marked: list[str] = []
    for task in tasks:
        stmt = (
            update(ex)
            .where(
                ex.c.run_id == task.run_id,
                ex.c.task_id == task.task_id,
                ex.c.status == task.status,
                ex.c.not_before.is_(None) if task.not_before is None else ex.c.not_before == task.not_before,
                ex.c.outbox.is_(None) if task.outbox is None else ex.c.outbox == task.outbox,
            )
            .values(not_before=None, deferred=False, outbox=token, updated_at=now)
        )
        if session.execute(stmt).rowcount:  # type: ignore[attr-defined]
            marked.append(task.task_id)
    return marked


def lost_tasks(
    session: Session, *, expired_before: datetime, limit: int = 10_000
) -> list[tuple[str, str, int]]:
    """Running tasks of running runs whose store lease ended before ``expired_before``."""
    rows = session.execute(
        select(_executions.c.run_id, _executions.c.task_id, _executions.c.attempts)
        .join(_runs, _runs.c.run_id == _executions.c.run_id)
        .where(
            _runs.c.status == RunStatus.RUNNING.value,
            _executions.c.status == TaskStatus.RUNNING.value,
            _executions.c.lease_until < expired_before,
        )
        .limit(limit)
    )
    return [(r[0], r[1], r[2]) for r in rows]


def bump_epoch(session: Session, run_id: str) -> int:
    """Start a new dispatch generation of a run (new message ids); the new epoch."""
    stmt = (
        update(_runs)
        .where(_runs.c.run_id == run_id)
        .values(epoch=_runs.c.epoch + 1, updated_at=utcnow())
        .returning(_runs.c.epoch)
    )
    return int(session.execute(stmt).scalar_one())


def record_incident(session: Session, run_id: str, message: str) -> None:
    """Record an infrastructure failure on a run that goes on (a log line, the run's message).

    The run stays ``running``: the reconciler recovers what the failure left behind.
    """
    log_line(session, run_id, None, 0, message, event="incident")
    session.execute(update(_runs).where(_runs.c.run_id == run_id).values(error_message=message))


def claim_stage(session: Session, run_id: str, stage: int) -> bool:
    """Take the right to dispatch ``stage``: true once per stage, however often it is asked."""
    stmt = (
        update(Run)
        .where(Run.run_id == run_id, Run.stage_cursor < stage)
        .values(stage_cursor=stage, updated_at=utcnow())
    )
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def set_run_status(
    session: Session, run_id: str, to: RunStatus, *, message: str | None = None, **fields: Any
) -> Change | None:
    """Move a run to ``to`` if its state machine allows it; the change, or ``None``."""
    legal = sorted(s.value for s, nxt in RUN_TRANSITIONS.items() if to in nxt)
    now = utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now, **fields}
    if to is RunStatus.RUNNING:
        values["started_at"] = func.coalesce(Run.started_at, now)
    if to.terminal:
        values.setdefault("finished_at", now)
    stmt = update(Run).where(Run.run_id == run_id, Run.status.in_(legal)).values(**values)
    if not session.execute(stmt).rowcount:  # type: ignore[attr-defined]
        return None
    session.execute(
        insert(ExecutionLog).values(
            run_id=run_id,
            task_id=None,
            attempt=0,
            event="transition",
            to_status=to.value,
            message=message,
            at=now,
        )
    )
    return Change(run_id, None, to.value, message=message)


def task_statuses(session: Session, run_id: str, stage: int | None = None) -> dict[str, TaskStatus]:
    """Task id -> status for a run, or for one stage of it."""
    stmt = select(Execution.task_id, Execution.status).where(Execution.run_id == run_id)
    if stage is not None:
        stmt = stmt.where(Execution.stage == stage)
    return {tid: TaskStatus(status) for tid, status in session.execute(stmt)}


def count_failures(session: Session, run_id: str) -> int:
    """How many tasks of the run ended in a failure of their own."""
    failures = [s.value for s in TaskStatus if s.failure]
    stmt = (
        select(func.count())
        .select_from(Execution)
        .where(Execution.run_id == run_id, Execution.status.in_(failures))
    )
    return int(session.execute(stmt).scalar_one())


def outputs_of(session: Session, run_id: str, task_ids: Sequence[str]) -> dict[str, Any]:
    """Task id -> stored output for the listed tasks of a run."""
    out: dict[str, Any] = {}
    for chunk in _chunks(task_ids, 500):
        stmt = select(Execution.task_id, Execution.output).where(
            Execution.run_id == run_id, Execution.task_id.in_(chunk)
        )
        # Not dict(result): a Result has keys(), so dict() would index it as a mapping.
        out.update({tid: output for tid, output in session.execute(stmt)})
    return out


def log_line(
    session: Session,
    run_id: str,
    task_id: str | None,
    attempt: int,
    message: str,
    *,
    worker: str | None = None,
    event: str = "log",
) -> None:
    """Append a log line to a task's (or the run's) history."""
    session.execute(
        insert(ExecutionLog).values(
            run_id=run_id,
            task_id=task_id,
            attempt=attempt,
            event=event,
            message=message,
            worker=worker,
            at=utcnow(),
        )
    )


def record_metrics(
    session: Session, run_id: str, task_id: str, attempt: int, metrics: dict[str, float]
) -> None:
    """Store the numeric metrics one attempt reported; a repeated write changes nothing."""
    if not metrics:
        return
    now = utcnow()
    rows = [
        {
            "run_id": run_id,
            "task_id": task_id,
            "attempt": attempt,
            "name": name[:100],
            "value": float(value),
            "recorded_at": now,
        }
        for name, value in sorted(metrics.items())
    ]
    # The same upsert statement in both dialects: a row already there (a redelivery) stays.
    dialect_insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(dialect_insert(_metrics).on_conflict_do_nothing(), rows)


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
