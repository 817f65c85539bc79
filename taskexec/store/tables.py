"""SQLAlchemy 2 tables of the result store: runs, executions, execution_logs, attempt_logs,
execution_metrics.

The same schema serves PostgreSQL (fleets) and SQLite (embedded mode). Schema changes
go through Alembic (``taskexec/store/migrations``); ``taskexec db upgrade`` applies them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "AttemptLogEntry",
    "Base",
    "Execution",
    "ExecutionLog",
    "ExecutionMetric",
    "Run",
    "Schedule",
    "utcnow",
]

# JSONB on PostgreSQL (indexable, compact), plain JSON text on SQLite.
JsonType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite keeps no zone: add it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC) if value is not None and dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class Run(Base):
    """One run: a manifest submitted once, its status and counters."""

    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(200))
    plan_name: Mapped[str | None] = mapped_column(String(500))
    variant: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    # Deferred: a 5,000-task manifest is megabytes of JSON, read once per process
    # (dispatch.compiled_run caches it), never with every look at a run's status.
    manifest: Mapped[dict[str, Any]] = mapped_column(JsonType, deferred=True)
    statistics: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    tenant: Mapped[str | None] = mapped_column(String(200), index=True)
    labels: Mapped[dict[str, str]] = mapped_column(JsonType, default=dict)
    #: The run's effective parameters: the plan's ``params:`` defaults with the submitter's
    #: overrides applied (NULL: the plan declares none).
    params: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    stage_count: Mapped[int] = mapped_column(Integer)
    #: Highest stage dispatched so far (-1: none); advanced by a conditional UPDATE so a
    #: stage is dispatched once even when the chord body runs twice.
    stage_cursor: Mapped[int] = mapped_column(Integer, default=-1)
    #: Dispatch generation: ``resume`` increments it, so re-sent messages get new ids.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    #: Why the run is stopping early: cancelled, max_failures, timeout; NULL while it runs.
    stop_reason: Mapped[str | None] = mapped_column(String(20))
    #: The Redis server (its INFO run_id) that holds the run's messages: when the broker
    #: restarts empty this changes, and the reconciler re-dispatches the run from here.
    broker_instance: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Execution(Base):
    """One atomic task of a run: its current status and last outcome."""

    __tablename__ = "executions"
    __table_args__ = (
        Index("ix_executions_run_stage", "run_id", "stage"),
        # Whether a run has a task not yet ended (dag runs ask after each task ends).
        Index("ix_executions_run_status", "run_id", "status"),
        # The reconciler's scans: running tasks by lease, retrying ones by due time.
        Index("ix_executions_status_lease", "status", "lease_until"),
        Index("ix_executions_status_due", "status", "not_before"),
        Index(
            "ix_executions_outbox",
            "outbox",
            postgresql_where=text("outbox IS NOT NULL"),
            sqlite_where=text("outbox IS NOT NULL"),
        ),
    )

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    stage: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: ``attempts`` when the current try began: ``taskexec retry`` gives a task a fresh
    #: budget of attempts while attempt numbers keep counting (earlier ones stay in the logs).
    retry_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Times the task was put back for a rate-limit token or a concurrency slot.
    throttled: Mapped[int] = mapped_column(Integer, default=0)
    #: Until when the worker running the task holds it; it renews this while it runs.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When the task's next message is due: a retrying task's backoff, a queued task's
    #: rate-limit or slot wait, a paced ETA. A message delayed in a worker's memory is lost
    #: with that worker: the reconciler sends the task again once this is well past.
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: True when no Celery message carries the next attempt: the reconciler sends it when due
    #: (backoffs longer than half the visibility timeout, which Redis would deliver twice).
    deferred: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The publication outbox: the token of the dispatch that queued the row and has not yet
    #: confirmed its message sent (NULL once sent). A dispatcher that dies between its commit
    #: and its publish leaves the token: the reconciler sends the task after a grace period.
    outbox: Mapped[str | None] = mapped_column(String(40))
    #: Upstream tasks not yet ended, in an ``execution: dag`` run: the transition that ends
    #: an upstream task decrements it in its own transaction; at zero the task is released.
    blockers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    output: Mapped[Any | None] = mapped_column(JsonType)
    #: The handler params of the latest attempt as rendered (templates filled in), secrets
    #: masked; NULL until an attempt renders them.
    params: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error_code: Mapped[str | None] = mapped_column(String(8))
    error_message: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(300))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ExecutionLog(Base):
    """One state transition or log line of a task (``task_id`` NULL: of the run)."""

    __tablename__ = "execution_logs"
    __table_args__ = (Index("ix_execution_logs_run_task", "run_id", "task_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    task_id: Mapped[str | None] = mapped_column(String(300))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    event: Mapped[str] = mapped_column(String(20))
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str | None] = mapped_column(String(20))
    error_code: Mapped[str | None] = mapped_column(String(8))
    message: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(300))
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class AttemptLogEntry(Base):
    """One stream of one attempt's logs (stdout, stderr, http, error, log), secrets masked.

    Written by the worker when the attempt ends, just before its outcome; at most
    ``TASKEXEC_MAX_LOG_BYTES`` per attempt, a cut marked in ``text`` and by ``truncated``.
    """

    __tablename__ = "attempt_logs"
    __table_args__ = (Index("ix_attempt_logs_run_task_attempt", "run_id", "task_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    task_id: Mapped[str] = mapped_column(String(300))
    attempt: Mapped[int] = mapped_column(Integer)
    stream: Mapped[str] = mapped_column(String(20))
    text: Mapped[str] = mapped_column(Text)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    #: When the stream began (its first line, or the exception).
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class ExecutionMetric(Base):
    """A numeric metric one attempt of a task reported (duration, tokens, cost, ...)."""

    __tablename__ = "execution_metrics"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Schedule(Base):
    """A recurring plan: its compiled manifests, when it fires, and what its last firing did.

    ``taskexec beat`` reads the scheduling columns and writes ``last_run_at`` (its own state,
    so a beat that takes over goes on where the last one stopped); the ``fire_schedule``
    task writes the ``last_fired_at``/``fired``/``skipped`` columns.
    """

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(200))
    #: The plan compiled at ``schedule add`` (one manifest per variant): a firing submits
    #: these, so a plan file edited or deleted later changes nothing.
    manifests: Mapped[list[dict[str, Any]]] = mapped_column(JsonType)
    cron: Mapped[str | None] = mapped_column(String(200))
    every_seconds: Mapped[float | None] = mapped_column(Float)
    overlap: Mapped[str] = mapped_column(String(10))
    tenant: Mapped[str | None] = mapped_column(String(200))
    labels: Mapped[dict[str, str]] = mapped_column(JsonType, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: When beat last sent a firing of this schedule.
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The due time of the last firing a worker handled: a redelivered firing is not newer.
    last_fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_run_ids: Mapped[list[str] | None] = mapped_column(JsonType)
    last_outcome: Mapped[str | None] = mapped_column(Text)
    fired: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
