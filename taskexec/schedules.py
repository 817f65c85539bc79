"""Recurring plans: when a schedule fires, its rows in the store, and what one firing does.

A schedule holds a plan compiled at ``taskexec schedule add`` (so a bad plan is refused
then, not at 3 a.m.) and a trigger: a cron expression (UTC) or an interval. ``taskexec
beat`` (:mod:`taskexec.beat`) sends a ``taskexec.fire_schedule`` message each time one
is due; a control worker then calls :func:`fire`, which applies the overlap policy and
submits one run per variant, labelled ``schedule=<id>``.

Example:
    >>> every("1h30m")
    5400.0
    >>> cron("*/15 * * * *")
    <crontab: */15 * * * * (m/h/dM/MY/d)>
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from taskexec.errors import BrokerUnavailableError, InvalidInputError
from taskexec.models import RunManifest
from taskexec.run import producer
from taskexec.services import Services
from taskexec.store.repository import schedules as rows
from taskexec.store.tables import Schedule, utcnow

__all__ = [
    "LABEL",
    "Fired",
    "Overlap",
    "ScheduleInfo",
    "add_schedule",
    "cron",
    "every",
    "fire",
    "get_schedule",
    "list_schedules",
    "remove_schedule",
    "set_enabled",
]

log = logging.getLogger(__name__)

#: The label every run of a schedule carries: ``schedule=<id>``.
LABEL = "schedule"

Overlap = Literal["skip", "allow"]

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
#: Shortest interval a schedule may have: beat is not a sub-second timer.
MIN_EVERY = 1.0


def every(text: str) -> float:
    """Seconds of an interval such as ``10m``, ``90s``, ``1h30m``, ``2d`` (a bare number: seconds).

    Raises:
        InvalidInputError: The text is not an interval of at least one second.
    """
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        seconds = float(raw)
    elif raw and _PART.sub("", raw) == "":
        seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(raw))
    else:
        raise InvalidInputError(
            f"{text!r} is not an interval (examples: 30s, 10m, 1h30m, 2d)", path="--every"
        )
    if seconds < MIN_EVERY:
        raise InvalidInputError(f"an interval is at least {MIN_EVERY:g} s, not {text!r}", path="--every")
    return seconds


def cron(text: str) -> crontab:
    """A Celery ``crontab`` of a five-field cron expression (minute hour day month weekday, UTC).

    ``@hourly``, ``@daily``, ``@weekly``, ``@monthly`` and ``@yearly`` are accepted too.

    Raises:
        InvalidInputError: The expression is not valid.
    """
    expr = _ALIASES.get(text.strip().lower(), text.strip())
    fields = expr.split()
    if len(fields) != 5:
        raise InvalidInputError(
            f"a cron expression has 5 fields (minute hour day month weekday), not {text!r}", path="--cron"
        )
    minute, hour, day, month, weekday = fields
    try:
        return crontab(minute=minute, hour=hour, day_of_month=day, month_of_year=month, day_of_week=weekday)
    except Exception as e:  # Celery's parser raises ValueError and its own ParseException
        raise InvalidInputError(f"invalid cron expression {text!r}: {e}", path="--cron") from None


class ScheduleInfo(BaseModel):
    """A schedule as ``taskexec schedule list --json`` shows it (without its manifests)."""

    model_config = ConfigDict(frozen=True)

    id: str
    plan_id: str
    variants: list[str]
    cron: str | None
    every_seconds: float | None
    overlap: Overlap
    tenant: str | None
    labels: dict[str, str]
    enabled: bool
    created_at: datetime
    last_run_at: datetime | None
    last_fired_at: datetime | None
    last_run_ids: list[str]
    last_outcome: str | None
    fired: int
    skipped: int

    @property
    def trigger(self) -> str:
        """``cron <expr>`` or ``every <seconds>s``."""
        return f"cron {self.cron}" if self.cron else f"every {self.every_seconds:g}s"


def _info(row: Schedule) -> ScheduleInfo:
    return ScheduleInfo(
        id=row.id,
        plan_id=row.plan_id,
        variants=[m.get("variant", "default") for m in row.manifests],
        cron=row.cron,
        every_seconds=row.every_seconds,
        overlap="allow" if row.overlap == "allow" else "skip",
        tenant=row.tenant,
        labels=row.labels or {},
        enabled=row.enabled,
        created_at=row.created_at,
        last_run_at=row.last_run_at,
        last_fired_at=row.last_fired_at,
        last_run_ids=row.last_run_ids or [],
        last_outcome=row.last_outcome,
        fired=row.fired,
        skipped=row.skipped,
    )


def add_schedule(
    session: Session,
    manifests: list[RunManifest],
    *,
    cron_expr: str | None = None,
    every_seconds: float | None = None,
    overlap: Overlap = "skip",
    tenant: str | None = None,
    labels: dict[str, str] | None = None,
    schedule_id: str | None = None,
) -> ScheduleInfo:
    """Insert a schedule (exactly one of ``cron_expr`` and ``every_seconds``).

    Raises:
        InvalidInputError: No trigger or two, a bad id, an id already taken, or a ``schedule`` label.
    """
    if (cron_expr is None) == (every_seconds is None):
        raise InvalidInputError("give exactly one of --cron and --every", path="--cron")
    if cron_expr is not None:
        cron(cron_expr)
    if labels and LABEL in labels:
        raise InvalidInputError(f"the label {LABEL!r} is set by the schedule itself", path="--label")
    sid = schedule_id or uuid.uuid4().hex[:12]
    if not _ID.match(sid):
        raise InvalidInputError(
            f"a schedule id is 1-64 letters, digits, '_', '.' or '-', not {sid!r}", path="--id"
        )
    if session.get(Schedule, sid) is not None:
        raise InvalidInputError(f"a schedule {sid!r} already exists", path="--id")
    row = Schedule(
        id=sid,
        plan_id=manifests[0].plan_id,
        manifests=[m.model_dump(mode="json") for m in manifests],
        cron=cron_expr.strip() if cron_expr is not None else None,
        every_seconds=every_seconds,
        overlap=overlap,
        tenant=tenant,
        labels=labels or {},
        enabled=True,
        created_at=utcnow(),
        fired=0,
        skipped=0,
    )
    session.add(row)
    session.flush()
    return _info(row)


def get_schedule(session: Session, schedule_id: str) -> ScheduleInfo:
    """One schedule; :class:`PlanError` (exit 2) when there is none."""
    row = session.get(Schedule, schedule_id)
    if row is None:
        raise InvalidInputError(f"no schedule {schedule_id!r}", path="ID")
    return _info(row)


def list_schedules(session: Session) -> list[ScheduleInfo]:
    """Every schedule, oldest first."""
    return [_info(r) for r in rows.schedules(session)]


def remove_schedule(session: Session, schedule_id: str) -> None:
    """Delete a schedule (its runs stay); :class:`PlanError` when there is none."""
    if not rows.delete_schedule(session, schedule_id):
        raise InvalidInputError(f"no schedule {schedule_id!r}", path="ID")


def set_enabled(session: Session, schedule_id: str, enabled: bool) -> None:
    """Pause or resume a schedule; :class:`PlanError` when there is none."""
    if not rows.set_schedule_enabled(session, schedule_id, enabled):
        raise InvalidInputError(f"no schedule {schedule_id!r}", path="ID")


@dataclass(frozen=True)
class Fired:
    """What one firing did: ``submitted`` runs, ``skipped`` (overlap), or ``ignored`` (why)."""

    outcome: Literal["submitted", "skipped", "ignored"]
    message: str
    run_ids: tuple[str, ...] = ()


def fire(svc: Services, schedule_id: str, due: datetime) -> Fired:
    """One firing of a schedule, due at ``due``: submit its runs, or skip them.

    Firings of one schedule are serialised by a Redis lock, so the overlap check and the
    submission cannot interleave with another firing; a redelivered firing (not newer
    than the last one handled) is ignored.

    Raises:
        BrokerUnavailableError: Redis cannot be reached (the caller retries).
        DatabaseUnavailableError: The store cannot be reached (the caller retries).
    """
    if svc.redis is None:
        raise BrokerUnavailableError("firing a schedule needs Redis (its lock)")
    with svc.redis.lock(f"taskexec:schedule:{schedule_id}:fire", timeout=120, blocking_timeout=60):
        with svc.store.begin() as s:
            row = s.get(Schedule, schedule_id)
            if row is None or not row.enabled:
                return Fired("ignored", "removed" if row is None else "disabled")
            if row.last_fired_at is not None and row.last_fired_at >= due:
                return Fired("ignored", f"a firing due at {due.isoformat()} was handled already")
            active = rows.active_runs_labelled(s, LABEL, schedule_id) if row.overlap != "allow" else []
            if active:
                done = Fired("skipped", f"skipped at {due:%Y-%m-%d %H:%M:%S}: run {active[0]} still active")
                rows.record_firing(s, schedule_id, due, done.message, None)
                return done
            manifests = [RunManifest.model_validate(m) for m in row.manifests]
            tenant, labels = row.tenant, {**(row.labels or {}), LABEL: schedule_id}
        run_ids = tuple(producer.submit(svc, m, tenant=tenant, labels=labels) for m in manifests)
        done = Fired("submitted", f"submitted {' '.join(run_ids)} at {due:%Y-%m-%d %H:%M:%S}", run_ids)
        with svc.store.begin() as s:
            rows.record_firing(s, schedule_id, due, done.message, run_ids)
        return done
