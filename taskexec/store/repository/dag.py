"""Upstream counts of an ``execution: dag`` run: which tasks an ending task releases.

Each task's row keeps ``blockers``, its upstream tasks not yet ended. The transition that
ends a task (the one that changed its status: a redelivered or duplicated message changes
none, so it decrements nothing) decrements the count of each task that depends on it, in
its own transaction. Then, in that same transaction, a task downstream of a task that ended
without success is skipped (E009, and its own dependants in turn), and a task whose count
reached zero with every upstream succeeded is queued into the outbox under a *ready* token
(``r:<run>``). Whoever settled the upstream publishes it after the commit
(:func:`claim_ready` takes the rows, so one publisher sends them); if nobody does, the
reconciler finds the rows in the outbox and sends them after ``TASKEXEC_RESEND_GRACE``.

A ``stages`` run's rows keep their counts too but nothing reads them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from taskexec.errors import RunNotFoundError
from taskexec.models import Change, ErrorCode, TaskStatus
from taskexec.store import manifests
from taskexec.store.repository._tables import EXECUTIONS, RUNS, chunks

__all__ = [
    "READY",
    "RunHead",
    "claim_ready",
    "is_dag",
    "ready_token",
    "reset_blockers",
    "run_head",
    "settle_downstream",
    "unfinished",
]

_T = TaskStatus
#: The statuses of a task not yet ended.
_OPEN = [s.value for s in TaskStatus if not s.terminal]

#: Prefix of the outbox token of a task released by its upstream's settle, not yet taken by
#: a publisher: ``r:<run id>``, one token per run, so that a publisher finds them by the
#: outbox's (partial) index, not by scanning the run's queued rows.
READY = "r:"


def ready_token(run_id: str) -> str:
    """The outbox token of a run's released tasks that no publisher has taken yet."""
    return (READY + run_id)[:40]


#: ``set_tasks_status`` without the downstream step: ``(session, run_id, ids, to, **kw)``.
Mover = Callable[..., list[Change]]


def is_dag(session: Session, run_id: str) -> bool:
    """Whether the run releases each task when its own upstream tasks have ended."""
    return manifests.compiled_run(session, run_id).manifest.execution == "dag"


def settle_downstream(
    session: Session, run_id: str, ended: Sequence[str], status: TaskStatus, move: Mover
) -> list[Change]:
    """After ``ended`` tasks moved to the terminal ``status``: decrement what depends on
    them, skip it (E009) when ``status`` is not a success, queue what is now free; the
    changes made (nothing for a ``stages`` run)."""
    cr = manifests.compiled_run(session, run_id)
    if cr.manifest.execution != "dag":
        return []
    if not any(cr.dependents.get(u) for u in ended):
        return []  # a sink: nothing to release (the common case of a wide run)
    # A stopping run skips nothing: its end cancels (E004) what waits, as in ``stages``.
    stopping = session.scalar(select(RUNS.c.stop_reason).where(RUNS.c.run_id == run_id)) is not None
    changes: list[Change] = []
    work: list[tuple[list[str], TaskStatus]] = [(list(ended), status)]
    while work:  # a skip ends tasks in turn: a worklist, not recursion (chains are long)
        ids, to = work.pop()
        counts = Counter(d for u in ids for d in cr.dependents.get(u, ()))
        if not counts:
            continue
        _decrement(session, run_id, counts)
        if stopping:
            continue
        if to.blocking:
            for u in ids:
                why = f"upstream task {u!r} ended {to.value}"
                skipped = move(
                    session,
                    run_id,
                    cr.dependents.get(u, []),
                    _T.SKIPPED,
                    allowed_from=[_T.PENDING],
                    error_code=ErrorCode.UPSTREAM_FAILED,
                    message=why,
                )
                changes += skipped
                if skipped:
                    work.append(([c.task_id for c in skipped if c.task_id], _T.SKIPPED))
        else:
            changes += _queue_free(session, run_id, list(counts), move)
    return changes


def reset_blockers(session: Session, run_id: str, task_ids: Sequence[str], move: Mover) -> list[Change]:
    """Recount the upstream tasks not yet ended of reopened tasks (``taskexec retry``), then
    skip those behind a task that ended without success and queue those now free."""
    cr = manifests.compiled_run(session, run_id)
    if cr.manifest.execution != "dag" or not task_ids:
        return []
    statuses = _statuses(session, run_id)
    upstream = {t: dict.fromkeys(cr.tasks[t].depends_on) for t in task_ids}
    counts = {t: sum(1 for d in ups if not statuses[d].terminal) for t, ups in upstream.items()}
    session.execute(
        update(EXECUTIONS)
        .where(EXECUTIONS.c.run_id == run_id, EXECUTIONS.c.task_id == bindparam("tid"))
        .values(blockers=bindparam("n")),
        [{"tid": t, "n": n} for t, n in counts.items()],
    )
    changes: list[Change] = []
    for t in task_ids:
        bad = next((d for d in cr.tasks[t].depends_on if statuses[d].blocking), None)
        if bad is not None:
            changes += move(
                session,
                run_id,
                [t],
                _T.SKIPPED,
                allowed_from=[_T.PENDING],
                error_code=ErrorCode.UPSTREAM_FAILED,
                message=f"upstream task {bad!r} ended {statuses[bad].value}",
            )
    return changes + _queue_free(session, run_id, list(task_ids), move)


@dataclass(frozen=True)
class RunHead:
    """What releasing a dag run's tasks reads of its run row (not the manifest: megabytes)."""

    status: str
    stop_reason: str | None
    stage_cursor: int
    epoch: int
    tenant: str | None
    started_at: datetime | None
    #: Whether released tasks wait for a publisher (:func:`claim_ready`).
    ready: bool = False
    #: Whether a task of the run has not ended (:func:`unfinished`).
    unfinished: bool = True


def run_head(session: Session, run_id: str) -> RunHead:
    """The run's status, stop reason, cursor, epoch, tenant and start, and whether it has
    released tasks to send and tasks not ended: one query, asked after every task of a dag
    run ends (:class:`RunNotFoundError` when there is no such run)."""
    r, e = RUNS.c, EXECUTIONS.c
    ready = (
        select(e.task_id)
        .where(e.run_id == run_id, e.outbox == ready_token(run_id), e.status == _T.QUEUED.value)
        .exists()
    )
    open_ = select(e.task_id).where(e.run_id == run_id, e.status.in_(_OPEN)).exists()
    row = session.execute(
        select(r.status, r.stop_reason, r.stage_cursor, r.epoch, r.tenant, r.started_at, ready, open_).where(
            r.run_id == run_id
        )
    ).one_or_none()
    if row is None:
        raise RunNotFoundError(f"no run {run_id!r} in the store", path="RUN")
    return RunHead(*row)


def claim_ready(session: Session, run_id: str, token: str) -> list[str]:
    """Take the run's released tasks that no publisher has taken yet: their outbox token
    becomes ``token`` (one conditional UPDATE: of two callers, each row goes to one)."""
    stmt = (
        update(EXECUTIONS)
        .where(
            EXECUTIONS.c.run_id == run_id,
            EXECUTIONS.c.outbox == ready_token(run_id),
            EXECUTIONS.c.status == _T.QUEUED.value,
        )
        .values(outbox=token)
        .returning(EXECUTIONS.c.task_id)
    )
    return [r[0] for r in session.execute(stmt)]


def unfinished(session: Session, run_id: str) -> bool:
    """Whether any task of the run has not ended (one row looked up, not the run's all)."""
    stmt = (  # an index lookup per status (ix_executions_run_status), however large the run
        select(EXECUTIONS.c.task_id)
        .where(EXECUTIONS.c.run_id == run_id, EXECUTIONS.c.status.in_(_OPEN))
        .limit(1)
    )
    return session.execute(stmt).first() is not None


def _decrement(session: Session, run_id: str, counts: Counter[str]) -> None:
    """One upstream fewer (``n`` fewer) for each pending task counted (executemany)."""
    session.execute(
        update(EXECUTIONS)
        .where(
            EXECUTIONS.c.run_id == run_id,
            EXECUTIONS.c.task_id == bindparam("tid"),
            EXECUTIONS.c.status == _T.PENDING.value,
        )
        .values(blockers=EXECUTIONS.c.blockers - bindparam("n")),
        # In task id order: two transactions decrementing the same tasks lock them in one
        # order (no deadlock).
        [{"tid": t, "n": counts[t]} for t in sorted(counts)],
    )


def _queue_free(session: Session, run_id: str, candidates: list[str], move: Mover) -> list[Change]:
    """Queue, under a ready token, the candidates still pending with no upstream left.

    Every upstream of such a task succeeded: one that ended otherwise skipped it in the
    transaction that ended it. A stopping run queues nothing (its end cancels what waits).
    """
    stopping = session.scalar(select(RUNS.c.stop_reason).where(RUNS.c.run_id == run_id))
    if stopping is not None:
        return []
    free: list[str] = []
    for chunk in chunks(candidates, 500):
        free += session.scalars(
            select(EXECUTIONS.c.task_id).where(
                EXECUTIONS.c.run_id == run_id,
                EXECUTIONS.c.task_id.in_(chunk),
                EXECUTIONS.c.status == _T.PENDING.value,
                EXECUTIONS.c.blockers <= 0,
            )
        ).all()
    if not free:
        return []
    return move(session, run_id, free, _T.QUEUED, allowed_from=[_T.PENDING], outbox=ready_token(run_id))


def _statuses(session: Session, run_id: str) -> dict[str, TaskStatus]:
    rows: Any = session.execute(
        select(EXECUTIONS.c.task_id, EXECUTIONS.c.status).where(EXECUTIONS.c.run_id == run_id)
    )
    return {tid: TaskStatus(st) for tid, st in rows}
