"""What the run dashboard reads (``taskexec ui``): pages of runs and tasks, counts, attempts.

Every query here is bounded: a page of runs is a keyset page on ``(submitted_at, run_id)``
(the ``submitted_at`` index answers it at any depth, where ``OFFSET`` would read every
row before the page), a page of tasks is a page of one run's rows, and what is drawn
(graph, timeline) is capped. A ``tenant`` given to a function restricts it to that
tenant's runs. Every function takes a Session and never commits.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from taskexec.errors import InvalidInputError, RunNotFoundError
from taskexec.models import RunStatus, RunSummary, TaskStatus
from taskexec.store.results import run_summary
from taskexec.store.tables import Execution, ExecutionLog, ExecutionMetric, Run, utcnow

__all__ = [
    "Attempt",
    "Bar",
    "HistoryLine",
    "RunFilter",
    "RunsPage",
    "TaskRow",
    "TasksPage",
    "WaitingGate",
    "attempts",
    "history",
    "run_row",
    "run_summary",
    "runs_page",
    "stage_counts",
    "status_counts",
    "tasks_page",
    "timeline",
    "waiting_gates",
]

#: Most runs or tasks one page holds.
MAX_PAGE = 500


@dataclass(frozen=True)
class RunFilter:
    """What the runs list is narrowed to (``None``: any)."""

    status: RunStatus | None = None
    plan: str | None = None
    tenant: str | None = None
    label: tuple[str, str] | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self, *, with_status: bool = True) -> list[ColumnElement[bool]]:
        """The filter as SQL conditions on ``runs``."""
        out: list[ColumnElement[bool]] = []
        if with_status and self.status is not None:
            out.append(Run.status == self.status.value)
        if self.plan:
            out.append(Run.plan_id == self.plan)
        if self.tenant is not None:
            out.append(Run.tenant == self.tenant)
        if self.label is not None:
            out.append(Run.labels[self.label[0]].as_string() == self.label[1])
        if self.since is not None:
            out.append(Run.submitted_at >= self.since)
        if self.until is not None:
            out.append(Run.submitted_at < self.until)
        return out


@dataclass(frozen=True)
class RunsPage:
    """A page of runs, newest first, and the cursor of the next page (``None``: the last)."""

    runs: list[RunSummary]
    next_cursor: str | None


def encode_cursor(submitted_at: datetime, run_id: str) -> str:
    """An opaque cursor for the page after the run ``(submitted_at, run_id)``.

    >>> from datetime import UTC
    >>> decode_cursor(encode_cursor(datetime(2026, 1, 1, tzinfo=UTC), "ab"))[1]
    'ab'
    """
    raw = json.dumps([submitted_at.isoformat(), run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The ``(submitted_at, run_id)`` a cursor stands for.

    Raises:
        InvalidInputError: Not a cursor this module made (E001).
    """
    try:
        at, run_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(at), str(run_id)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(f"not a page cursor: {cursor[:40]!r}", path="cursor") from e


def runs_page(session: Session, where: RunFilter, *, cursor: str | None = None, limit: int = 50) -> RunsPage:
    """A page of runs, newest first, after ``cursor`` (a keyset page: as fast at any depth)."""
    limit = max(1, min(limit, MAX_PAGE))
    stmt = select(Run).where(*where.where()).order_by(Run.submitted_at.desc(), Run.run_id.desc())
    if cursor:
        at, run_id = decode_cursor(cursor)
        stmt = stmt.where(or_(Run.submitted_at < at, and_(Run.submitted_at == at, Run.run_id < run_id)))
    rows = list(session.scalars(stmt.limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    summaries = [run_summary(session, r) for r in rows]
    last = rows[-1] if rows and more else None
    return RunsPage(summaries, encode_cursor(last.submitted_at, last.run_id) if last else None)


def status_counts(session: Session, where: RunFilter) -> dict[str, int]:
    """How many runs of each status match the filter (its own status aside)."""
    stmt = select(Run.status, func.count()).where(*where.where(with_status=False)).group_by(Run.status)
    return {s: n for s, n in session.execute(stmt)}


def run_row(session: Session, run_id: str, tenant: str | None = None) -> Run:
    """A run's row, the manifest deferred; :class:`RunNotFoundError` when there is none, or
    when it is another tenant's (the same answer: a tenant learns nothing of others' runs)."""
    run = session.get(Run, run_id)
    if run is None or (tenant is not None and run.tenant != tenant):
        raise RunNotFoundError(f"no run {run_id!r} in the store", path="RUN")
    return run


def stage_counts(session: Session, run_id: str) -> dict[int, dict[str, int]]:
    """Per stage, how many of its tasks are in each status."""
    stmt = (
        select(Execution.stage, Execution.status, func.count())
        .where(Execution.run_id == run_id)
        .group_by(Execution.stage, Execution.status)
    )
    out: dict[int, dict[str, int]] = {}
    for stage, status, n in session.execute(stmt):
        out.setdefault(stage, {})[status] = n
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class TaskRow:
    """One task as the task table and the graph show it."""

    task_id: str
    stage: int
    status: str
    attempts: int
    error_code: str | None
    error_message: str | None
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def seconds(self) -> float | None:
        """Wall time, once started (up to now while it runs)."""
        if self.started_at is None:
            return None
        return round(((self.finished_at or utcnow()) - self.started_at).total_seconds(), 3)


@dataclass(frozen=True)
class TasksPage:
    """A page of a run's tasks (by stage, then id) and how many match in all."""

    tasks: list[TaskRow]
    total: int
    offset: int
    limit: int


_TASK_COLUMNS = (
    Execution.task_id,
    Execution.stage,
    Execution.status,
    Execution.attempts,
    Execution.error_code,
    Execution.error_message,
    Execution.worker,
    Execution.started_at,
    Execution.finished_at,
)


def tasks_page(
    session: Session,
    run_id: str,
    *,
    status: str | None = None,
    search: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> TasksPage:
    """A page of a run's tasks, filtered by status and by a substring of the id."""
    limit = max(1, min(limit, MAX_PAGE))
    offset = max(0, offset)
    cond: list[ColumnElement[bool]] = [Execution.run_id == run_id]
    if status:
        cond.append(Execution.status == status)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        cond.append(Execution.task_id.like(f"%{escaped}%", escape="\\"))
    total = session.scalar(select(func.count()).select_from(Execution).where(*cond)) or 0
    stmt = (
        select(*_TASK_COLUMNS)
        .where(*cond)
        .order_by(Execution.stage, Execution.task_id)
        .offset(offset)
        .limit(limit)
    )
    return TasksPage([TaskRow(*r) for r in session.execute(stmt)], total, offset, limit)


@dataclass
class Attempt:
    """One attempt of a task, from its transitions: when it ran, where, how it ended."""

    number: int
    worker: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    status: str | None = None
    error_code: str | None = None
    message: str | None = None
    seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    transitions: list[tuple[datetime, str, str | None]] = field(default_factory=list)


def attempts(session: Session, run_id: str, task_id: str) -> list[Attempt]:
    """Every attempt of a task, oldest first, from its transition log and metrics."""
    out: dict[int, Attempt] = {}
    logs = (
        select(ExecutionLog)
        .where(ExecutionLog.run_id == run_id, ExecutionLog.task_id == task_id)
        .order_by(ExecutionLog.id)
    )
    for row in session.scalars(logs):
        if row.event != "transition" or row.to_status is None or row.attempt < 1:
            continue
        a = out.setdefault(row.attempt, Attempt(row.attempt))
        a.transitions.append((row.at, row.to_status, row.message))
        if row.to_status == TaskStatus.RUNNING.value:
            a.started_at = a.started_at or row.at
            a.worker = row.worker or a.worker
            continue
        a.status = row.to_status
        if TaskStatus(row.to_status).terminal or row.to_status == TaskStatus.RETRYING.value:
            a.ended_at = row.at
            a.error_code = row.error_code
            a.message = row.message
    metrics = select(ExecutionMetric.attempt, ExecutionMetric.name, ExecutionMetric.value).where(
        ExecutionMetric.run_id == run_id, ExecutionMetric.task_id == task_id
    )
    for n, name, value in session.execute(metrics):
        out.setdefault(n, Attempt(n)).metrics[name] = value
    for a in out.values():
        if a.started_at is not None and a.ended_at is not None:
            a.seconds = round((a.ended_at - a.started_at).total_seconds(), 3)
    return [out[n] for n in sorted(out)]


@dataclass(frozen=True)
class Bar:
    """One bar of the timeline: an attempt, or a wait (retry backoff, approval)."""

    task_id: str
    stage: int
    attempt: int
    worker: str | None
    kind: str  # attempt | retry_wait | approval_wait | queued
    status: str
    start: datetime
    end: datetime | None


def timeline(session: Session, run_id: str, *, limit: int = 2000) -> tuple[list[Bar], bool]:
    """The run's attempts and waits as timeline bars, by start (at most ``limit``); whether
    there were more.

    An attempt runs from ``running`` to its outcome (``validating`` stays inside it); a retry
    wait from ``retrying`` to the next attempt's start; an approval wait from
    ``waiting_approval`` to the decision.
    """
    logs = (
        select(
            ExecutionLog.task_id,
            ExecutionLog.attempt,
            ExecutionLog.to_status,
            ExecutionLog.worker,
            ExecutionLog.at,
            Execution.stage,
        )
        .join(
            Execution,
            and_(Execution.run_id == ExecutionLog.run_id, Execution.task_id == ExecutionLog.task_id),
        )
        .where(
            ExecutionLog.run_id == run_id,
            ExecutionLog.event == "transition",
            # Nothing starts or ends a bar at these: a retry wait lasts until the next attempt.
            ExecutionLog.to_status.not_in([TaskStatus.PENDING.value, TaskStatus.QUEUED.value]),
        )
        .order_by(ExecutionLog.id)
        # Streamed (a server-side cursor on PostgreSQL): the page stops reading at its limit.
        .execution_options(yield_per=1000)
    )
    waits = {TaskStatus.RETRYING.value: "retry_wait", TaskStatus.WAITING_APPROVAL.value: "approval_wait"}
    # task -> (kind, attempt, worker, start, stage)
    open_: dict[str, tuple[str, int, str | None, datetime, int]] = {}
    bars: list[Bar] = []
    for task_id, attempt, to, worker, at, stage in session.execute(logs):
        if task_id is None or to is None or to == TaskStatus.VALIDATING.value:
            continue  # (the join leaves out the run's own lines: their task_id is NULL)
        prev = open_.pop(task_id, None)
        if prev is not None:
            kind, n, w, start, _ = prev
            bars.append(Bar(task_id, stage, n, w, kind, to, start, at))
            if len(bars) > limit:
                return sorted(bars[:limit], key=lambda b: b.start), True
        if to == TaskStatus.RUNNING.value:
            open_[task_id] = ("attempt", attempt, worker, at, stage)
        elif to in waits:
            open_[task_id] = (waits[to], attempt, None, at, stage)
    for task_id, (kind, n, w, start, stage) in open_.items():
        status = TaskStatus.RUNNING.value if kind == "attempt" else kind
        bars.append(Bar(task_id, stage, n, w, kind, status, start, None))
    bars.sort(key=lambda b: b.start)
    return bars[:limit], len(bars) > limit


@dataclass(frozen=True)
class HistoryLine:
    """One row of a run's history (``execution_logs``): a transition, a decision, an action."""

    at: datetime
    task_id: str | None
    attempt: int
    event: str
    to_status: str | None
    error_code: str | None
    message: str | None
    worker: str | None


def history(
    session: Session, run_id: str, *, task_id: str | None = None, after: int = 0, limit: int = 200
) -> list[HistoryLine]:
    """A run's (or one task's) history, oldest first, from row ``after`` on."""
    stmt = select(ExecutionLog).where(ExecutionLog.run_id == run_id).order_by(ExecutionLog.id)
    if task_id is not None:
        stmt = stmt.where(ExecutionLog.task_id == task_id)
    rows = session.scalars(stmt.offset(max(0, after)).limit(max(1, min(limit, MAX_PAGE * 4))))
    return [
        HistoryLine(r.at, r.task_id, r.attempt, r.event, r.to_status, r.error_code, r.message, r.worker)
        for r in rows
    ]


@dataclass(frozen=True)
class WaitingGate:
    """A task waiting at an approval gate."""

    run_id: str
    plan_id: str
    tenant: str | None
    task_id: str
    question: str | None
    deadline: str | None
    since: datetime


def waiting_gates(session: Session, tenant: str | None = None, *, limit: int = 200) -> list[WaitingGate]:
    """Every task waiting for approval, oldest first (of ``tenant``'s runs, if given)."""
    stmt = (
        select(
            Execution.run_id,
            Run.plan_id,
            Run.tenant,
            Execution.task_id,
            Execution.output,
            Execution.updated_at,
        )
        .join(Run, Run.run_id == Execution.run_id)
        .where(Execution.status == TaskStatus.WAITING_APPROVAL.value)
        .order_by(Execution.updated_at)
        .limit(limit)
    )
    if tenant is not None:
        stmt = stmt.where(Run.tenant == tenant)
    out = []
    for run_id, plan_id, run_tenant, task_id, output, since in session.execute(stmt):
        gate = output.get("approval", {}) if isinstance(output, dict) else {}
        gate = gate if isinstance(gate, dict) else {}
        question, deadline = gate.get("message"), gate.get("deadline")
        out.append(
            WaitingGate(
                run_id,
                plan_id,
                run_tenant,
                task_id,
                str(question) if question is not None else None,
                str(deadline) if deadline is not None else None,
                since,
            )
        )
    return out
