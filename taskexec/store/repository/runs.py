"""Run rows: create, read, move through the run's state machine, and record what happened.

Every function takes a Session and never commits: the caller frames the transaction
(``with store.begin() as session``) and publishes messages only after it commits.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from taskexec.errors import InvalidInputError, RunNotFoundError
from taskexec.models import RUN_TRANSITIONS, Change, RunManifest, RunStatus, TaskStatus
from taskexec.store.repository._tables import RUNS
from taskexec.store.tables import Execution, ExecutionLog, Run, utcnow

#: The shortest prefix of a run id that ``resolve_run_id`` looks up.
MIN_PREFIX = 6
#: How many candidates an ambiguous prefix names.
CANDIDATES = 5

__all__ = [
    "CANDIDATES",
    "MIN_PREFIX",
    "add_run",
    "bump_epoch",
    "claim_stage",
    "get_run",
    "latest_run_id",
    "load_manifest",
    "log_line",
    "record_incident",
    "resolve_run_id",
    "runs_in_flight",
    "set_broker_instance",
    "set_run_status",
    "set_stage_cursor",
    "set_stop_reason",
    "start_retry",
    "stop_reason",
]


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
            params=manifest.param_values if manifest.params else None,
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
                "blockers": len(set(t.depends_on)),
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


def resolve_run_id(session: Session, ref: str) -> str:
    """The run id ``ref`` stands for: the id itself, or a unique prefix of at least
    :data:`MIN_PREFIX` characters, looked up in one query on the primary key's index.

    Raises:
        RunNotFoundError: No run has that id or prefix (or the prefix is too short).
        InvalidInputError: Several runs start with the prefix (E001, naming a few).
    """
    exact = RUNS.c.run_id == ref
    if len(ref) >= MIN_PREFIX:
        # A range the primary key's btree answers in any collation (the ids are hex: every
        # character after the prefix sorts before "z"); substr() keeps exactly the prefix.
        prefixed = (
            (RUNS.c.run_id >= ref)
            & (RUNS.c.run_id < ref + "z")
            & (func.substr(RUNS.c.run_id, 1, len(ref)) == ref)
        )
        stmt = select(RUNS.c.run_id).where(exact | prefixed).order_by(RUNS.c.run_id).limit(CANDIDATES + 1)
    else:
        stmt = select(RUNS.c.run_id).where(exact)
    found = list(session.scalars(stmt))
    if ref in found or len(found) == 1:
        return ref if ref in found else found[0]
    if not found:
        short = f" (a run id prefix has at least {MIN_PREFIX} characters)" if len(ref) < MIN_PREFIX else ""
        raise RunNotFoundError(f"no run {ref!r} in the store{short}", path="RUN")
    named = ", ".join(found[:CANDIDATES]) + (", …" if len(found) > CANDIDATES else "")
    raise InvalidInputError(f"run id prefix {ref!r} is ambiguous: {named} (give more characters)", path="RUN")


def latest_run_id(session: Session, plan_id: str | None = None) -> str | None:
    """The newest run's id (of ``plan_id`` if given), by submission time; ``None`` if none."""
    stmt = select(RUNS.c.run_id).order_by(RUNS.c.submitted_at.desc(), RUNS.c.run_id.desc()).limit(1)
    if plan_id is not None:
        stmt = stmt.where(RUNS.c.plan_id == plan_id)
    found: str | None = session.scalar(stmt)
    return found


def stop_reason(session: Session, run_id: str) -> str | None:
    """Why the run is stopping (``cancelled``, ``max_failures``, ``timeout``), or ``None``."""
    reason: str | None = session.scalar(select(RUNS.c.stop_reason).where(RUNS.c.run_id == run_id))
    return reason


def load_manifest(run: Run) -> RunManifest:
    """The manifest stored with a run."""
    return RunManifest.model_validate(run.manifest)


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


def claim_stage(session: Session, run_id: str, stage: int) -> bool:
    """Take the right to dispatch ``stage``: true once per stage, however often it is asked."""
    stmt = (
        update(Run)
        .where(Run.run_id == run_id, Run.stage_cursor < stage)
        .values(stage_cursor=stage, updated_at=utcnow())
    )
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def bump_epoch(session: Session, run_id: str) -> int:
    """Start a new dispatch generation of a run (new message ids); the new epoch."""
    stmt = (
        update(RUNS)
        .where(RUNS.c.run_id == run_id)
        .values(epoch=RUNS.c.epoch + 1, updated_at=utcnow())
        .returning(RUNS.c.epoch)
    )
    return int(session.execute(stmt).scalar_one())


def record_incident(session: Session, run_id: str, message: str) -> None:
    """Record an infrastructure failure on a run that goes on (a log line, the run's message).

    The run stays ``running``: the reconciler recovers what the failure left behind.
    """
    log_line(session, run_id, None, 0, message, event="incident")
    session.execute(update(RUNS).where(RUNS.c.run_id == run_id).values(error_message=message))


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


def set_stop_reason(session: Session, run_id: str, reason: str, *, overwrite: bool = False) -> bool:
    """Mark a run as stopping (``cancelled``, ``max_failures``, ``timeout``): true if this
    call set it. Without ``overwrite`` the first reason stays (a cancel overwrites one)."""
    stmt = update(RUNS).where(RUNS.c.run_id == run_id)
    if not overwrite:
        stmt = stmt.where(RUNS.c.stop_reason.is_(None))
    return bool(session.execute(stmt.values(stop_reason=reason, updated_at=utcnow())).rowcount)  # type: ignore[attr-defined]


def set_stage_cursor(session: Session, run_id: str, cursor: int) -> None:
    """Move a run's stage cursor (a stopped run's goes past its last stage: nothing more goes out)."""
    session.execute(update(RUNS).where(RUNS.c.run_id == run_id).values(stage_cursor=cursor))


def set_broker_instance(session: Session, run_id: str, instance: str | None) -> None:
    """Record the broker identity that holds the run's latest messages.

    Written only when it changed: a dag run publishes after each task ends, and an UPDATE
    whose condition leaves the row out takes no lock on it (publishers do not queue on it).
    """
    session.execute(
        update(RUNS)
        .where(RUNS.c.run_id == run_id, RUNS.c.broker_instance.is_distinct_from(instance))
        .values(broker_instance=instance)
    )


def start_retry(session: Session, run_id: str) -> None:
    """Clear a run's end (``taskexec retry``): no stop reason, statistics or error, a new epoch
    (new message ids: what a cancel revoked stays revoked), and a new start: the retry runs
    its own ``stop.timeout`` from when it starts, not from the first try's start."""
    session.execute(
        update(RUNS)
        .where(RUNS.c.run_id == run_id)
        .values(
            stop_reason=None,
            statistics=None,
            error_message=None,
            finished_at=None,
            started_at=None,
            epoch=RUNS.c.epoch + 1,
            updated_at=utcnow(),
        )
    )


def runs_in_flight(session: Session) -> list[Any]:
    """Runs queued or running, with what the reconciler looks at: (run_id, status,
    broker_instance, stage_cursor, stop_reason, started_at or submitted_at)."""
    rows = session.execute(
        select(
            RUNS.c.run_id,
            RUNS.c.status,
            RUNS.c.broker_instance,
            RUNS.c.stage_cursor,
            RUNS.c.stop_reason,
            func.coalesce(RUNS.c.started_at, RUNS.c.submitted_at),
        ).where(RUNS.c.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value]))
    )
    return list(rows)
