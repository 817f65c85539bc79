"""Schedule rows: listed, removed, paused, fired (and skipped), and read by ``taskexec beat``.

A firing's overlap check asks which runs of a schedule are still active: runs carry the
schedule's id as a label.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from taskexec.models import RunStatus
from taskexec.store.tables import Run, Schedule

__all__ = [
    "BeatRow",
    "active_runs_labelled",
    "delete_schedule",
    "enabled_schedules",
    "record_firing",
    "schedules",
    "set_last_run",
    "set_schedule_enabled",
]


class BeatRow(NamedTuple):
    """What ``taskexec beat`` needs of an enabled schedule."""

    id: str
    cron: str | None
    every_seconds: float | None
    last_run_at: datetime | None
    created_at: datetime


def schedules(session: Session) -> Sequence[Schedule]:
    """Every schedule, oldest first."""
    return session.scalars(select(Schedule).order_by(Schedule.created_at, Schedule.id)).all()


def delete_schedule(session: Session, schedule_id: str) -> bool:
    """Delete a schedule (its runs stay); false when there was none."""
    return bool(session.execute(delete(Schedule).where(Schedule.id == schedule_id)).rowcount)  # type: ignore[attr-defined]


def set_schedule_enabled(session: Session, schedule_id: str, enabled: bool) -> bool:
    """Pause or resume a schedule; false when there is none."""
    stmt = update(Schedule).where(Schedule.id == schedule_id).values(enabled=enabled)
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def active_runs_labelled(session: Session, label: str, value: str) -> list[str]:
    """The queued or running runs whose ``label`` is ``value``, sorted."""
    # Few runs are active at any time: filter their labels here rather than with JSON
    # operators, which differ between PostgreSQL and SQLite.
    active = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
    rows = session.execute(select(Run.run_id, Run.labels).where(Run.status.in_(active)))
    return sorted(rid for rid, labels in rows if (labels or {}).get(label) == value)


def record_firing(
    session: Session, schedule_id: str, due: datetime, message: str, run_ids: Sequence[str] | None
) -> None:
    """Record a firing due at ``due``: the runs it submitted, or (``None``) that it skipped them."""
    values: dict[str, Any] = {"last_fired_at": due, "last_outcome": message}
    if run_ids is not None:
        values |= {"fired": Schedule.fired + 1, "last_run_ids": list(run_ids)}
    else:
        values["skipped"] = Schedule.skipped + 1
    session.execute(update(Schedule).where(Schedule.id == schedule_id).values(**values))


def set_last_run(session: Session, schedule_id: str, due: datetime) -> None:
    """Store when beat last sent a schedule's firing (so that a restart does not send it again)."""
    session.execute(update(Schedule).where(Schedule.id == schedule_id).values(last_run_at=due))


def enabled_schedules(session: Session) -> list[BeatRow]:
    """The enabled schedules' triggers and last runs, for beat."""
    cols = (Schedule.id, Schedule.cron, Schedule.every_seconds, Schedule.last_run_at, Schedule.created_at)
    return [BeatRow(*r) for r in session.execute(select(*cols).where(Schedule.enabled.is_(True)))]
