"""What the reconciler looks for in the store, and the outbox that lets it find it.

A queued row carries its dispatch's outbox token until the broker took its message; a
delayed message's due time is the row's ``not_before``; a running row's lease is its
``lease_until``. These queries find the rows no message will move on, and mark them as
sent again without racing another round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from taskexec.models import RunStatus, TaskStatus
from taskexec.store.repository._tables import EXECUTIONS, RUNS, chunks
from taskexec.store.tables import utcnow

__all__ = [
    "Overdue",
    "clear_outbox",
    "expired_approvals",
    "lost_tasks",
    "mark_outbox",
    "mark_resent",
    "overdue_tasks",
    "set_due",
]


def clear_outbox(session: Session, run_id: str, token: str) -> int:
    """Mark the messages of one dispatch (``token``) as sent; how many rows it cleared."""
    stmt = (
        update(EXECUTIONS)
        .where(EXECUTIONS.c.run_id == run_id, EXECUTIONS.c.outbox == token)
        .values(outbox=None)
    )
    return int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def set_due(session: Session, run_id: str, due: dict[str, datetime]) -> None:
    """Record when each listed task's delayed message is due (a paced ETA): executemany."""
    if due:
        session.execute(
            update(EXECUTIONS)
            .where(EXECUTIONS.c.run_id == run_id, EXECUTIONS.c.task_id == bindparam("tid"))
            .values(not_before=bindparam("due")),
            [{"tid": tid, "due": at} for tid, at in due.items()],
        )


def mark_outbox(session: Session, run_id: str, task_ids: Sequence[str], token: str) -> None:
    """Put queued tasks (being sent again) back in the outbox under ``token``."""
    for chunk in chunks(task_ids, 500):
        session.execute(
            update(EXECUTIONS)
            .where(
                EXECUTIONS.c.run_id == run_id,
                EXECUTIONS.c.task_id.in_(chunk),
                EXECUTIONS.c.status == TaskStatus.QUEUED.value,
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
    ex = EXECUTIONS
    rows = session.execute(
        select(ex.c.run_id, ex.c.task_id, ex.c.status, ex.c.not_before, ex.c.outbox)
        .join(RUNS, RUNS.c.run_id == ex.c.run_id)
        .where(
            RUNS.c.status == RunStatus.RUNNING.value,
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
    ex = EXECUTIONS
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
        select(EXECUTIONS.c.run_id, EXECUTIONS.c.task_id, EXECUTIONS.c.attempts)
        .join(RUNS, RUNS.c.run_id == EXECUTIONS.c.run_id)
        .where(
            RUNS.c.status == RunStatus.RUNNING.value,
            EXECUTIONS.c.status == TaskStatus.RUNNING.value,
            EXECUTIONS.c.lease_until < expired_before,
        )
        .limit(limit)
    )
    return [(r[0], r[1], r[2]) for r in rows]


def expired_approvals(session: Session, now: datetime) -> list[tuple[str, str]]:
    """(run, task) of approval gates of running runs whose timeout passed undecided."""
    rows = session.execute(
        select(EXECUTIONS.c.run_id, EXECUTIONS.c.task_id)
        .join(RUNS, RUNS.c.run_id == EXECUTIONS.c.run_id)
        .where(
            RUNS.c.status == RunStatus.RUNNING.value,
            EXECUTIONS.c.status == TaskStatus.WAITING_APPROVAL.value,
            EXECUTIONS.c.not_before < now,
        )
    )
    return [(r[0], r[1]) for r in rows]
