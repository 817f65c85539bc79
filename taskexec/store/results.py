"""The store's results as the contract's models: run results, task results, run summaries.

What clients, reports and notifications read; the writes are in
:mod:`taskexec.store.repository`. Every function takes a Session and never commits.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from taskexec.errors import RunNotFoundError
from taskexec.models import ErrorCode, RunResult, RunStatistics, RunStatus, RunSummary, TaskResult, TaskStatus
from taskexec.store.repository import get_run
from taskexec.store.tables import Execution, Run, utcnow

__all__ = ["list_runs", "run_result", "task_result"]


def _statistics(run: Run, tasks: list[TaskResult]) -> RunStatistics:
    end = run.finished_at or utcnow()
    duration = (end - run.started_at).total_seconds() if run.started_at else None
    return RunStatistics.of(tasks, round(duration, 3) if duration is not None else None)


def _task_result(row: Execution) -> TaskResult:
    return TaskResult(
        id=row.task_id,
        stage=row.stage,
        status=TaskStatus(row.status),
        attempts=row.attempts,
        throttled=row.throttled or 0,
        error_code=ErrorCode(row.error_code) if row.error_code else None,
        error_message=row.error_message,
        output=row.output,
        worker=row.worker,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def task_result(session: Session, run_id: str, task_id: str) -> TaskResult:
    """One task's stored result; :class:`RunNotFoundError` when there is no such task."""
    row = session.get(Execution, (run_id, task_id))
    if row is None:
        raise RunNotFoundError(f"no task {task_id!r} in run {run_id!r}", path="TASK")
    return _task_result(row)


def run_result(session: Session, run_id: str) -> RunResult:
    """A run with all its task results, tasks in manifest order."""
    run = get_run(session, run_id)
    order = {t["id"]: i for i, t in enumerate(run.manifest["tasks"])}
    rows = session.scalars(select(Execution).where(Execution.run_id == run_id)).all()
    tasks = sorted((_task_result(r) for r in rows), key=lambda t: order.get(t.id, len(order)))
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
        if run.statistics is not None:
            stats = RunStatistics.model_validate(run.statistics)
        else:
            stats = _live_statistics(session, run)
        out.append(
            RunSummary(
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
        )
        if len(out) >= limit:
            break
    return out


def _live_statistics(session: Session, run: Run) -> RunStatistics:
    rows = session.execute(
        select(Execution.status, Execution.attempts, Execution.throttled).where(
            Execution.run_id == run.run_id
        )
    ).all()
    tasks = [
        TaskResult(id=str(i), status=TaskStatus(s), attempts=a, throttled=t or 0)
        for i, (s, a, t) in enumerate(rows)
    ]
    return _statistics(run, tasks)
