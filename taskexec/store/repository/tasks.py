"""Task rows (``executions``): claims under leases, guarded status changes, what ran.

State changes are conditional UPDATEs (``... WHERE status IN (allowed predecessors)``):
a duplicate delivery of a message, or two workers racing, changes a row at most once,
and each change that happened writes one ``execution_logs`` row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from taskexec.errors import IllegalTransitionError, RunNotFoundError
from taskexec.models import TASK_TRANSITIONS, Change, ErrorCode, TaskStatus
from taskexec.store.repository import dag
from taskexec.store.repository._tables import EXECUTIONS, LOGS, METRICS, RUNS, chunks
from taskexec.store.repository.runs import get_run
from taskexec.store.tables import Execution, utcnow

__all__ = [
    "TaskState",
    "claim_attempt",
    "count_failures",
    "count_throttled",
    "outputs_of",
    "record_metrics",
    "record_params",
    "renew_lease",
    "reopen_tasks",
    "reset_blockers",
    "set_task_status",
    "set_tasks_status",
    "task_state",
    "task_statuses",
]


def _predecessors(to: TaskStatus, allowed_from: Iterable[TaskStatus] | None) -> list[str]:
    legal = {s for s, nxt in TASK_TRANSITIONS.items() if to in nxt}
    if allowed_from is not None:
        wanted = set(allowed_from)
        if not wanted <= legal:
            bad = ", ".join(sorted(s.value for s in wanted - legal))
            raise IllegalTransitionError(f"a task cannot go from {bad} to {to.value}")
        legal = wanted
    return sorted(s.value for s in legal)


def set_tasks_status(
    session: Session,
    run_id: str,
    task_ids: Sequence[str],
    to: TaskStatus,
    **kw: Any,
) -> list[Change]:
    """Move every listed task that may legally do so to ``to``; the changes that happened.

    With ``attempt``, only a task still on that attempt moves: a worker that lost its
    claim (taken over after its lease ran out) writes nothing. In an ``execution: dag``
    run, the tasks that ended here release (or skip) what depends on them in this same
    transaction (:mod:`.dag`): their changes follow the listed tasks' own.
    """
    changes = _move(session, run_id, task_ids, to, **kw)
    if changes and to.terminal:
        ended = [c.task_id for c in changes if c.task_id is not None]
        changes += dag.settle_downstream(session, run_id, ended, to, _move)
    return changes


def _move(
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
    """:func:`set_tasks_status` without what follows in a ``dag`` run."""
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
    for chunk in chunks(task_ids, 500):
        stmt = (
            update(EXECUTIONS)
            .where(
                EXECUTIONS.c.run_id == run_id,
                EXECUTIONS.c.task_id.in_(chunk),
                EXECUTIONS.c.status.in_(_predecessors(to, allowed_from)),
                *([EXECUTIONS.c.attempts == attempt] if attempt is not None else []),
            )
            .values(**values)
            .returning(EXECUTIONS.c.task_id, EXECUTIONS.c.attempts, EXECUTIONS.c.worker)
        )
        changed.extend((r[0], r[2] or "", r[1]) for r in session.execute(stmt))
    if changed:
        session.execute(
            insert(LOGS),
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
            EXECUTIONS.c.status,
            EXECUTIONS.c.attempts,
            EXECUTIONS.c.worker,
            EXECUTIONS.c.lease_until,
            EXECUTIONS.c.not_before,
            EXECUTIONS.c.deferred,
            EXECUTIONS.c.retry_base,
            RUNS.c.stop_reason,
            RUNS.c.tenant,
        )
        .join(RUNS, RUNS.c.run_id == EXECUTIONS.c.run_id)
        .where(EXECUTIONS.c.run_id == run_id, EXECUTIONS.c.task_id == task_id)
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


def record_params(session: Session, run_id: str, task_id: str, params: dict[str, Any]) -> None:
    """The handler params the current attempt renders (templates filled in, no secret)."""
    session.execute(
        update(EXECUTIONS)
        .where(EXECUTIONS.c.run_id == run_id, EXECUTIONS.c.task_id == task_id)
        .values(params=params)
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
        EXECUTIONS.c.status == TaskStatus.QUEUED.value,
        and_(
            EXECUTIONS.c.status == TaskStatus.RETRYING.value,
            or_(EXECUTIONS.c.not_before.is_(None), EXECUTIONS.c.not_before <= now),
        ),
    )
    if takeover_from is not None:
        claimable = or_(
            claimable,
            and_(
                EXECUTIONS.c.status == TaskStatus.RUNNING.value,
                EXECUTIONS.c.attempts == takeover_from,
                or_(EXECUTIONS.c.lease_until.is_(None), EXECUTIONS.c.lease_until < now),
            ),
        )
    stmt = (
        update(EXECUTIONS)
        .where(EXECUTIONS.c.run_id == run_id, EXECUTIONS.c.task_id == task_id, claimable)
        .values(
            status=TaskStatus.RUNNING.value,
            attempts=EXECUTIONS.c.attempts + 1,
            worker=worker,
            lease_until=lease_until,
            not_before=None,
            deferred=False,
            started_at=func.coalesce(EXECUTIONS.c.started_at, now),
            updated_at=now,
        )
        .returning(EXECUTIONS.c.attempts)
    )
    attempt = session.execute(stmt).scalar_one_or_none()
    if attempt is not None:
        session.execute(
            insert(LOGS).values(
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
    for chunk in chunks(reopened, 500):
        session.execute(
            update(Execution)
            .where(Execution.run_id == run_id, Execution.task_id.in_(chunk))
            .values(error_code=None)
        )
    return changes


def reset_blockers(session: Session, run_id: str, task_ids: Sequence[str]) -> list[Change]:
    """Recount reopened tasks' upstream tasks not yet ended (``dag`` runs, ``taskexec retry``);
    what is now free is queued into the outbox, what sits behind a failure skipped."""
    return dag.reset_blockers(session, run_id, task_ids, set_tasks_status)


def count_throttled(session: Session, run_id: str, task_id: str, *, due: datetime | None = None) -> None:
    """Count one wait of a task for a rate-limit token or a concurrency slot, due at ``due``.

    The due time is the delayed message's: it waits in a worker's memory, and the
    reconciler sends the task again if it is still waiting well past it (that worker died).
    """
    values: dict[str, Any] = {"throttled": EXECUTIONS.c.throttled + 1}
    if due is not None:
        values["not_before"] = due
    session.execute(
        update(EXECUTIONS)
        .where(
            EXECUTIONS.c.run_id == run_id,
            EXECUTIONS.c.task_id == task_id,
            EXECUTIONS.c.status.in_([TaskStatus.QUEUED.value, TaskStatus.RETRYING.value]),
        )
        .values(**values)
    )


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
    for chunk in chunks(task_ids, 500):
        stmt = select(Execution.task_id, Execution.output).where(
            Execution.run_id == run_id, Execution.task_id.in_(chunk)
        )
        # Not dict(result): a Result has keys(), so dict() would index it as a mapping.
        out.update({tid: output for tid, output in session.execute(stmt)})
    return out


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
    session.execute(dialect_insert(METRICS).on_conflict_do_nothing(), rows)
