"""The store's results as the contract's models: run results, task results, run summaries.

What clients, reports and notifications read; the writes are in
:mod:`taskexec.store.repository`. Every function takes a Session and never commits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from taskexec.errors import RunNotFoundError
from taskexec.models import ErrorCode, RunResult, RunStatistics, RunStatus, RunSummary, TaskResult, TaskStatus
from taskexec.store.manifests import compiled_run
from taskexec.store.repository import get_run
from taskexec.store.tables import Execution, ExecutionLog, ExecutionMetric, Run, utcnow

__all__ = ["list_runs", "run_result", "run_summary", "task_result"]


def _statistics(run: Run, tasks: list[TaskResult]) -> RunStatistics:
    end = run.finished_at or utcnow()
    duration = (end - run.started_at).total_seconds() if run.started_at else None
    return RunStatistics.of(tasks, round(duration, 3) if duration is not None else None)


#: The metric each attempt records: the handler's own time (``workers/attempt.py``).
_HANDLER_TIME = "duration_seconds"


@dataclass(slots=True)
class _Attempts:
    """What the store holds of a task's attempts: handler time, start and end of each."""

    handler: dict[int, float] = field(default_factory=dict)
    started: dict[int, datetime] = field(default_factory=dict)
    ended: dict[int, datetime] = field(default_factory=dict)


def _attempts(session: Session, run_id: str, task_id: str | None = None) -> dict[str, _Attempts]:
    """Per task: each attempt's handler time (its metric) and, from the transition log, when
    it started (``running``) and when it left ``running``."""
    out: dict[str, _Attempts] = {}
    metrics = select(ExecutionMetric.task_id, ExecutionMetric.attempt, ExecutionMetric.value).where(
        ExecutionMetric.run_id == run_id, ExecutionMetric.name == _HANDLER_TIME
    )
    logs = (
        select(ExecutionLog.task_id, ExecutionLog.attempt, ExecutionLog.to_status, ExecutionLog.at)
        .where(
            ExecutionLog.run_id == run_id,
            ExecutionLog.task_id.is_not(None),
            ExecutionLog.event == "transition",
        )
        .order_by(ExecutionLog.id)
    )
    if task_id is not None:
        metrics = metrics.where(ExecutionMetric.task_id == task_id)
        logs = logs.where(ExecutionLog.task_id == task_id)
    for tid, attempt, value in session.execute(metrics):
        out.setdefault(tid, _Attempts()).handler[attempt] = value
    for logged, attempt, to, at in session.execute(logs):
        if logged is None:
            continue
        a = out.setdefault(logged, _Attempts())
        if to == TaskStatus.RUNNING.value:
            a.started[attempt] = at
        elif attempt in a.started and attempt not in a.ended:
            a.ended[attempt] = at
    return out


def _times(row: Execution, attempts: _Attempts | None, now: datetime) -> tuple[float | None, float | None]:
    """``(execution_seconds, wall_seconds)`` of a task; ``(None, None)`` before it started."""
    if row.started_at is None:
        return None, None
    status = TaskStatus(row.status)
    end = row.finished_at or (row.updated_at if status.terminal else now)
    wall = max(0.0, (end - row.started_at).total_seconds())
    a = attempts or _Attempts()
    execution = 0.0
    for n in range(1, row.attempts + 1):
        if n in a.handler:
            execution += a.handler[n]
        elif n in a.started:
            stop = a.ended.get(n)
            if stop is None:  # the attempt under way (or one whose end was not logged)
                stop = now if n == row.attempts and status is TaskStatus.RUNNING else None
            if stop is not None:
                execution += max(0.0, (stop - a.started[n]).total_seconds())
    if not a.handler and not a.started:  # nothing recorded per attempt: the wall time is all we know
        execution = wall
    return round(execution, 6), round(wall, 6)


def _task_result(
    row: Execution,
    attempts: _Attempts | None = None,
    now: datetime | None = None,
    case: dict[str, Any] | None = None,
) -> TaskResult:
    execution, wall = _times(row, attempts, now or utcnow())
    return TaskResult(
        id=row.task_id,
        stage=row.stage,
        status=TaskStatus(row.status),
        attempts=row.attempts,
        throttled=row.throttled or 0,
        case=case,
        params=row.params,
        error_code=ErrorCode(row.error_code) if row.error_code else None,
        error_message=row.error_message,
        output=row.output,
        worker=row.worker,
        started_at=row.started_at,
        finished_at=row.finished_at,
        execution_seconds=execution,
        wall_seconds=wall,
    )


def task_result(session: Session, run_id: str, task_id: str) -> TaskResult:
    """One task's stored result; :class:`RunNotFoundError` when there is no such task."""
    row = session.get(Execution, (run_id, task_id))
    if row is None:
        raise RunNotFoundError(f"no task {task_id!r} in run {run_id!r}", path="TASK")
    found = compiled_run(session, run_id).tasks.get(task_id)  # parsed once per process
    case = found.case if found is not None else None
    return _task_result(row, _attempts(session, run_id, task_id).get(task_id), case=case)


def run_result(session: Session, run_id: str) -> RunResult:
    """A run with all its task results, tasks in manifest order, each with its matrix case."""
    run = get_run(session, run_id)
    listed = run.manifest["tasks"]
    order = {t["id"]: i for i, t in enumerate(listed)}
    cases = {t["id"]: t["case"] for t in listed if t.get("case") is not None}
    rows = session.scalars(select(Execution).where(Execution.run_id == run_id)).all()
    attempts = _attempts(session, run_id)
    now = utcnow()
    found = (_task_result(r, attempts.get(r.task_id), now, cases.get(r.task_id)) for r in rows)
    tasks = sorted(found, key=lambda t: order.get(t.id, len(order)))
    return RunResult(
        run_id=run.run_id,
        plan_id=run.plan_id,
        variant=run.variant,
        status=RunStatus(run.status),
        statistics=_statistics(run, tasks),
        submitted_at=run.submitted_at,
        finished_at=run.finished_at,
        tenant=run.tenant,
        labels=run.labels or {},
        params=run.params or {},
        error_message=run.error_message,
        tasks=tasks,
    )


def list_runs(
    session: Session,
    *,
    status: RunStatus | None = None,
    tenant: str | None = None,
    label: tuple[str, str] | None = None,
    limit: int = 100,
) -> list[RunSummary]:
    """Runs, newest first, with their statistics (stored at the end, else counted now)."""
    stmt = select(Run).order_by(Run.submitted_at.desc(), Run.run_id).limit(limit if not label else None)
    if status is not None:
        stmt = stmt.where(Run.status == status.value)
    if tenant is not None:
        stmt = stmt.where(Run.tenant == tenant)
    out: list[RunSummary] = []
    for run in session.scalars(stmt):
        if label and (run.labels or {}).get(label[0]) != label[1]:
            continue
        out.append(run_summary(session, run))
        if len(out) >= limit:
            break
    return out


def run_summary(session: Session, run: Run) -> RunSummary:
    """A run row as a summary: its stored statistics, or counted now while it goes on."""
    if run.statistics is not None:
        stats = RunStatistics.model_validate(run.statistics)
    else:
        retried = case((Execution.attempts > 1, Execution.attempts - 1), else_=0)
        rows = session.execute(
            select(
                Execution.status,
                func.count(),
                func.coalesce(func.sum(retried), 0),
                func.coalesce(func.sum(Execution.throttled), 0),
            )
            .where(Execution.run_id == run.run_id)
            .group_by(Execution.status)
        ).all()
        end = run.finished_at or utcnow()
        duration = (end - run.started_at).total_seconds() if run.started_at else None
        stats = RunStatistics.counted(
            {status: n for status, n, _, _ in rows},
            retries=int(sum(r for _, _, r, _ in rows)),
            throttled=int(sum(t for _, _, _, t in rows)),
            duration_seconds=round(duration, 3) if duration is not None else None,
        )
    return RunSummary(
        run_id=run.run_id,
        plan_id=run.plan_id,
        variant=run.variant,
        status=RunStatus(run.status),
        statistics=stats,
        submitted_at=run.submitted_at,
        finished_at=run.finished_at,
        tenant=run.tenant,
        labels=run.labels or {},
    )
