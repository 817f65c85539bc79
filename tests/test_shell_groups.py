"""A shell step's whole process tree dies with it: on a killed worker, a timeout, a cancel,
and when the command ends leaving children behind (issue 15, defect 7).

Each test's command starts a grandchild, ``sleep`` with a duration no other process uses,
found in ``/proc`` by its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskexec import Client, RunStatus, parse_plan
from taskexec.errors import TaskCancelled
from taskexec.handlers import HandlerContext, HandlerTimedOut
from taskexec.settings import Settings
from tests.conftest import Fleet, wait_for
from workers.handlers import resolve

SETTINGS = Settings(allowed_handlers="shell")


def unique_sleep() -> str:
    """A ``sleep`` duration no other process on this machine runs: 300.<random> seconds."""
    return f"300.{uuid.uuid4().int % 10**9:09d}"


def sleepers(duration: str) -> list[int]:
    """PIDs of the live processes running ``sleep <duration>``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argv[:2] == [b"sleep", duration.encode()] and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def duration() -> Iterator[str]:
    """A unique sleep duration; any sleeper left behind is killed after the test."""
    d = unique_sleep()
    try:
        yield d
    finally:
        for pid in sleepers(d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def ctx(**kw: object) -> HandlerContext:
    return HandlerContext(run_id="r", task_id="t", settings=SETTINGS, **kw)  # type: ignore[arg-type]


def test_a_timeout_kills_the_grandchildren(duration: str) -> None:
    with pytest.raises(HandlerTimedOut):
        resolve("shell", SETTINGS)({"argv": ["sh", "-c", f"sleep {duration}; echo"], "timeout": 1}, {}, ctx())
    # SIGKILL went to the whole group; under load the kernel may take a moment to end it.
    wait_for(lambda: sleepers(duration) == [], timeout=2, what="the timed-out command's sleep to die")


def test_a_cancel_kills_the_grandchildren(duration: str) -> None:
    started = time.monotonic()
    with pytest.raises(TaskCancelled):
        resolve("shell", SETTINGS)(
            {"argv": ["sh", "-c", f"sleep {duration}; echo"]},
            {},
            ctx(is_cancelled=lambda: time.monotonic() - started > 1),
        )
    wait_for(lambda: sleepers(duration) == [], timeout=2, what="the cancelled command's sleep to die")


def test_children_left_behind_by_a_finished_command_are_killed(duration: str) -> None:
    out = resolve("shell", SETTINGS)(
        {"argv": ["sh", "-c", f"sleep {duration} >/dev/null 2>&1 & echo started"]}, {}, ctx()
    )
    assert out["stdout"] == "started\n"
    wait_for(lambda: sleepers(duration) == [], timeout=10, what="the background sleep to be killed")


def test_a_worker_process_killed_takes_its_command_tree_along(duration: str, tmp_path: Path) -> None:
    """The handler in a process of its own, SIGKILLed while its command's ``sleep`` runs."""
    code = textwrap.dedent(
        f"""
        from taskexec.handlers import HandlerContext, HandlerTimedOut
        from taskexec.settings import Settings
        from workers.handlers import resolve
        s = Settings(allowed_handlers="shell")
        resolve("shell", s)({{"argv": ["sh", "-c", "sleep {duration}; echo"]}}, {{}},
                           HandlerContext(run_id="r", task_id="t", settings=s))
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    try:
        wait_for(lambda: sleepers(duration) != [], timeout=30, what="the command's sleep")
        worker.kill()
        worker.wait(timeout=10)
        wait_for(lambda: sleepers(duration) == [], timeout=10, what="the orphaned sleep to be killed")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.mark.integration
def test_kill_9_of_a_worker_and_its_pool_kills_the_shell_steps_grandchild(
    fleet: Fleet, duration: str
) -> None:
    """Issue 15, defect 7: the step's ``sleep`` was re-parented to PID 1 and ran on."""
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    executor = next(p for p in fleet.procs if fleet.names[p.pid] == "exec")
    plan = {
        "tasks": [
            {"id": "long", "handler": "shell", "params": {"argv": ["sh", "-c", f"sleep {duration}; echo"]}}
        ]
    }
    with Client(settings) as client:
        handle = client.submit(parse_plan(json.dumps(plan)))
        wait_for(lambda: sleepers(duration) != [], timeout=60, what="the step's sleep")
        fleet.kill(executor)  # the executor and its pool processes, kill -9
        executor.wait(timeout=10)
        wait_for(lambda: sleepers(duration) == [], timeout=15, what="the step's sleep to die with its worker")
        handle.cancel()
        assert handle.status().status is not RunStatus.SUCCEEDED
