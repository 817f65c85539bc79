"""Attempt logs (``attempt_logs``): each attempt's streams, written once it ends, read by clients.

A worker writes an attempt's logs in one statement pair, keyed by (run, task, attempt):
the write replaces what an earlier try of the same transaction left (a commit whose reply
was lost, then retried), so an attempt never has its streams twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.orm import Session

from taskexec.models import AttemptLog
from taskexec.store.repository.tasks import task_state
from taskexec.store.tables import AttemptLogEntry

__all__ = ["LogStream", "add_attempt_logs", "attempt_logs", "logged_attempts"]

ATTEMPT_LOGS = cast(Table, AttemptLogEntry.__table__)

#: One stream as a worker hands it over: ``(stream, text, truncated, began_at)``.
LogStream = tuple[str, str, bool, datetime]


def add_attempt_logs(
    session: Session, run_id: str, task_id: str, attempt: int, streams: Sequence[LogStream]
) -> None:
    """Store an attempt's streams (replacing any stored for that attempt)."""
    t = ATTEMPT_LOGS.c
    session.execute(
        delete(ATTEMPT_LOGS).where(t.run_id == run_id, t.task_id == task_id, t.attempt == attempt)
    )
    if streams:
        session.execute(
            insert(ATTEMPT_LOGS),
            [
                {
                    "run_id": run_id,
                    "task_id": task_id,
                    "attempt": attempt,
                    "stream": stream,
                    "text": text,
                    "truncated": truncated,
                    "at": at,
                }
                for stream, text, truncated, at in streams
            ],
        )


def attempt_logs(
    session: Session, run_id: str, task_id: str | None = None, attempt: int | None = None
) -> list[AttemptLog]:
    """A run's stored logs (of one task, of one attempt), in the order they were stored.

    Raises:
        RunNotFoundError: ``task_id`` is not a task of the run (E001), or the run is missing.
    """
    if task_id is not None:
        task_state(session, run_id, task_id)  # an unknown task is an error, not "no logs"
    t = AttemptLogEntry
    stmt = select(t).where(t.run_id == run_id).order_by(t.id)
    if task_id is not None:
        stmt = stmt.where(t.task_id == task_id)
    if attempt is not None:
        stmt = stmt.where(t.attempt == attempt)
    return [
        AttemptLog(
            run_id=r.run_id,
            task_id=r.task_id,
            attempt=r.attempt,
            stream=r.stream,
            text=r.text,
            truncated=r.truncated,
            at=r.at,
        )
        for r in session.scalars(stmt)
    ]


def logged_attempts(
    session: Session, run_id: str, task_id: str | None = None, attempt: int | None = None
) -> list[tuple[str, int]]:
    """The ``(task, attempt)`` pairs of a run with stored logs, in the order they were stored."""
    t = ATTEMPT_LOGS.c
    stmt = (
        select(t.task_id, t.attempt, func.min(t.id).label("first"))
        .where(t.run_id == run_id)
        .group_by(t.task_id, t.attempt)
        .order_by("first")
    )
    if task_id is not None:
        stmt = stmt.where(t.task_id == task_id)
    if attempt is not None:
        stmt = stmt.where(t.attempt == attempt)
    return [(task, n) for task, n, _ in session.execute(stmt)]
