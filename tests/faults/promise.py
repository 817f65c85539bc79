"""What the fault suite counts: the promise's invariant, and the helpers every case uses.

:func:`invariant` checks, in PostgreSQL and in the execution ledger the ``ledger`` handler
writes (``tests/handlers.py``): the run is terminal as expected and its status never left
a terminal state; every task has exactly one terminal transition; each (task, attempt)
executed at most once, no task beyond ``max_attempts`` or beyond what the store counted,
no two executions of one task overlapping in time; one side effect per succeeded task.
:func:`ran_once` adds, for cases where nothing interrupted any handler: exactly one
execution per task, attempt 1.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from taskexec import Client, RunResult, RunStatus, TaskStatus, parse_plan
from taskexec.settings import Settings
from tests.faults.conftest import World

TERMINAL = ("succeeded", "failed", "validation_failed", "timed_out", "error", "cancelled", "skipped")
RUN_ENDS = ("succeeded", "failed", "cancelled", "timed_out", "error")


def client_of(world: World) -> Client:
    settings = world.fleet.settings()
    assert isinstance(settings, Settings)
    return Client(settings)


def sql(world: World, query: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(world.pg.url.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(query), params))
    finally:
        engine.dispose()


def invariant(world: World, result: RunResult, status: RunStatus, *, overlap_ok: bool = False) -> None:
    """The run ended as expected, every task once, every execution counted (module docstring)."""
    assert result.status is status, (result.status, [(t.id, t.status, t.error_message) for t in result.tasks])
    path = run_path(world, result.run_id)
    first_end = next((i for i, st in enumerate(path) if st in RUN_ENDS), None)
    assert first_end == len(path) - 1, f"the run's status left a terminal state: {path}"
    ends = _terminal_counts(world, result.run_id)
    budget = {tid: limit for tid, limit in _max_attempts(world, result.run_id).items()}
    runs = world.executions(result.run_id)
    for t in result.tasks:
        assert t.status.terminal, t
        assert ends.get(t.id) == 1, f"{t.id}: {ends.get(t.id)} terminal transitions"
        if t.status not in (TaskStatus.SKIPPED, TaskStatus.CANCELLED):
            assert t.attempts >= 1, t
        assert t.attempts <= budget[t.id], f"{t.id}: {t.attempts} attempts, {budget[t.id]} allowed"
        mine = sorted((e for e in runs if e.task == t.id), key=lambda e: e.started)
        attempts = [e.attempt for e in mine]
        assert len(attempts) == len(set(attempts)), f"{t.id}: an attempt executed twice: {mine}"
        assert all(a <= t.attempts for a in attempts), f"{t.id}: executions beyond the store's count: {mine}"
        if not overlap_ok:  # a killed execution (no end) is over: its process is gone
            for before, after in itertools.pairwise(mine):
                assert before.ended is None or before.ended <= after.started, f"{t.id}: overlapping {mine}"
    ledger = world.side_effects(result.run_id)
    for t in result.tasks:
        if t.status is TaskStatus.SUCCEEDED and t.output and t.output.get("ledger"):
            assert ledger.get(t.id) == 1, f"{t.id}: {ledger.get(t.id)} side effects"


def ran_once(world: World, result: RunResult) -> None:
    """Nothing interrupted these handlers: each ledger task's handler ran exactly once, attempt 1."""
    [(manifest,)] = sql(world, "SELECT manifest FROM runs WHERE run_id = :r", r=result.run_id)
    ledgered = {t["id"] for t in manifest["tasks"] if t["handler"] == "python:tests.handlers:ledger"}
    runs = world.executions(result.run_id)
    counts = {t: sum(1 for e in runs if e.task == t) for t in ledgered}
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}
    again = [(t.id, t.attempts) for t in result.tasks if t.id in ledgered and t.attempts != 1]
    assert not again, f"attempts beyond the first: {again}"


def run_path(world: World, run_id: str) -> list[str]:
    """The run's statuses in the order they were recorded."""
    rows = sql(
        world,
        "SELECT to_status FROM execution_logs WHERE run_id = :r AND task_id IS NULL "
        "AND event = 'transition' ORDER BY id",
        r=run_id,
    )
    return [to for (to,) in rows]


def _max_attempts(world: World, run_id: str) -> dict[str, int]:
    [(manifest,)] = sql(world, "SELECT manifest FROM runs WHERE run_id = :r", r=run_id)
    return {t["id"]: t["retry"]["max_attempts"] for t in manifest["tasks"]}


def _terminal_counts(world: World, run_id: str) -> dict[str, int]:
    rows = sql(
        world,
        "SELECT task_id, to_status FROM execution_logs WHERE run_id = :r AND task_id IS NOT NULL",
        r=run_id,
    )
    counts: dict[str, int] = {}
    for task_id, to in rows:
        if to in TERMINAL:
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def ledger_task(world: World, tid: str = "work", delay: float = 3.0, **params: Any) -> dict[str, Any]:
    """A task of the ``ledger`` handler: works ``delay`` s, then writes its side effect once."""
    return {
        "id": tid,
        "handler": "python:tests.handlers:ledger",
        "timeout": 7,
        "retry": {"max_attempts": 3, "backoff": 0.1, "jitter": False},
        "params": world.ledger_params(delay=delay, **params),
    }


def pool_children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def worker_running(world: World, pid: int) -> Any:
    """The worker process (group leader) whose pool process ``pid`` is."""
    for proc in world.fleet.procs:
        if proc.pid == pid or pid in pool_children(proc.pid):
            return proc
        # `taskexec worker` execs celery: the group leader is the worker's main process.
    raise AssertionError(f"no worker of the fleet runs pid {pid}")


def submit(world: World, doc: dict[str, Any], execution: str = "stages") -> tuple[Client, str]:
    client = client_of(world)
    return client, client.submit(parse_plan(doc), execution=execution).run_id


def wait_end(client: Client, run_id: str, timeout: float = 90) -> RunResult:
    result = client.wait(run_id, timeout=timeout)
    assert result.status.terminal, f"run still {result.status} after {timeout} s: {result.tasks}"
    return result
