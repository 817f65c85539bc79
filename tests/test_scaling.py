"""A fleet of separate worker process groups: one run spreads over all, one group stops mid-run.

Each group is its own ``taskexec worker`` process (``-n executor1@%h``, ``-n executor2@%h``,
``-n validator1@%h``), started and stopped independently, as on separate hosts. Throughput
and speed-up figures are in ``bench/scaling.py``; this file asserts no timing.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskexec import Client, RunStatus, TaskStatus, parse_plan
from taskexec.settings import Settings
from tests.conftest import Fleet, wait_for

pytestmark = pytest.mark.integration

GROUPS = ("executor1", "executor2", "validator1")


@pytest.fixture
def groups(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    """Two executor groups and a validator group, one prefork process each."""
    f = Fleet(fleet_env, tmp_path)
    try:
        f.start_many(
            ("executor", 1, "executor1"), ("executor", 1, "executor2"), ("validator", 1, "validator1")
        )
        yield f
    finally:
        f.stop()


def pool_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The prefork pool processes of a worker (children of its main process)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def group_of(worker: str | None, pids: dict[int, str]) -> str | None:
    """The group that ran a task, from its ``worker`` field: a node name, or ``host:pid``."""
    if not worker:
        return None
    for name in GROUPS:
        if f"{name}@" in worker:
            return name
    tail = worker.rsplit(":", 1)[-1]
    return pids.get(int(tail)) if tail.isdigit() else None


def plan(n: int, delay: float) -> dict[str, Any]:
    """``n`` stub tasks with output criteria, so that each runs on an executor, then a validator."""
    return {
        "id": "spread",
        "tasks": [
            {
                "id": "t",
                "handler": "stub",
                "params": {"delay": delay},
                "retry": {"max_attempts": 1},
                "validate": [{"path": "task_id", "op": "exists"}],
                "matrix": {"strategy": "cartesian", "params": {"i": list(range(n))}},
            }
        ],
    }


def test_a_run_spreads_over_every_group_and_a_warm_stop_loses_nothing(groups: Fleet) -> None:
    settings = groups.settings()
    assert isinstance(settings, Settings)
    by_name = {groups.names[p.pid]: p for p in groups.procs}
    pids = {pid: name for name, p in by_name.items() for pid in pool_pids(p)}
    with Client(settings) as client:
        handle = client.submit(parse_plan(plan(40, 0.3)))

        def running_on_executor2() -> bool:
            tasks = handle.status().tasks
            done = Counter(group_of(t.worker, pids) for t in tasks if t.status is TaskStatus.SUCCEEDED)
            return (
                done["executor1"] > 0
                and done["executor2"] > 0
                and any(
                    t.status is TaskStatus.RUNNING and group_of(t.worker, pids) == "executor2" for t in tasks
                )
            )

        wait_for(
            running_on_executor2, timeout=30, what="tasks done on both executors, one running on executor2"
        )
        in_flight = [
            t.id
            for t in handle.status().tasks
            if t.status is TaskStatus.RUNNING and group_of(t.worker, pids) == "executor2"
        ]
        # TERM to the main process alone, as a supervisor stopping the group does: a warm
        # shutdown finishes the task at hand. (TERM to the whole process group would reach
        # the pool children too, whose default TERM action ends the task at once.)
        executor2 = by_name["executor2"]
        executor2.send_signal(signal.SIGTERM)
        assert executor2.wait(timeout=30) == 0, "executor2 did not stop cleanly within 30 s"

        result = handle.wait(timeout=60, poll=0.2)
        # The groups still up count what they ran: validator1 did every validate step.
        stats = client.app.control.inspect(timeout=2.0).stats() or {}

    assert result.status is RunStatus.SUCCEEDED, result.statistics
    assert len(result.tasks) == 40
    assert all(t.status is TaskStatus.SUCCEEDED for t in result.tasks)
    # Nothing lost nor run twice: one attempt each, the interrupted group's task included.
    assert [t.id for t in result.tasks if t.attempts != 1] == []
    ran = Counter(group_of(t.worker, pids) for t in result.tasks)
    assert set(ran) == {"executor1", "executor2"}, ran
    for tid in in_flight:
        assert group_of(next(t for t in result.tasks if t.id == tid).worker, pids) == "executor2"
    validated = {
        name.split("@")[0]: (s.get("total") or {}).get("taskexec.validate", 0) for name, s in stats.items()
    }
    assert validated.get("validator1") == 40, validated
    assert not any(validated.get(g) for g in ("executor1", "executor2")), validated
