"""The live view: rendered to a pseudo-terminal (escape codes, progress) and to a pipe (none).

Rendering is checked on hand-made results; the command is checked end to end in embedded
mode, in a pty (``os.openpty`` with a set size and ``TERM=xterm-256color``) and piped.
``watch`` is checked while an embedded run goes on in another process (it finds that run's
Redis under ``TASKEXEC_HOME`` and follows its events) and after it (it reads the store).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import select
import shutil
import sqlite3
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from rich.console import Console

from taskexec.client import Client
from taskexec.live import _events_client, changes, render
from taskexec.models import ErrorCode, RunResult, RunStatistics, RunStatus, TaskResult, TaskStatus
from taskexec.settings import Settings
from tests.conftest import ROOT, wait_for
from tests.test_embedded import LIMIT, TASKEXEC, assert_nothing_left, env_for, taskexec

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def home() -> Iterator[Path]:
    """A short TASKEXEC_HOME (a Unix socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tx-", dir="/tmp"))
    try:
        yield path / "home"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def task(tid: str, status: TaskStatus, stage: int = 0, attempts: int = 1, **kw: Any) -> TaskResult:
    started = T0 if status is not TaskStatus.PENDING else None
    return TaskResult(id=tid, stage=stage, status=status, attempts=attempts, started_at=started, **kw)


def result(tasks: list[TaskResult], status: RunStatus = RunStatus.RUNNING) -> RunResult:
    return RunResult(
        run_id="r1",
        plan_id="p",
        variant="default",
        status=status,
        statistics=RunStatistics.of(tasks, 1.5),
        submitted_at=T0,
        tasks=tasks,
    )


def plain(renderable: Any, width: int = 120) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(renderable)
    return buf.getvalue()


def test_render_shows_stages_counts_active_tasks_and_failures() -> None:
    r = result(
        [
            task("a", TaskStatus.SUCCEEDED),
            task("b", TaskStatus.FAILED, error_code=ErrorCode.RETRIES_EXHAUSTED, error_message="boom"),
            task("c", TaskStatus.RUNNING, stage=1, attempts=2),
            task("d", TaskStatus.RETRYING, stage=1, error_message="attempt 1: flaky"),
            task("e", TaskStatus.PENDING, stage=2, attempts=0),
        ]
    )
    text = plain(render(r, now=T0 + timedelta(seconds=3.3)))
    assert "\x1b[" not in text  # a non-terminal gets no escape codes
    lines = text.splitlines()
    stage0 = next(line for line in lines if line.strip().startswith("stage 0"))
    assert "2/2" in stage0 and "1 succeeded" in stage0 and "1 failed" in stage0
    stage1 = next(line for line in lines if line.strip().startswith("stage 1"))
    assert "0/2" in stage1 and "1 running" in stage1 and "1 retrying" in stage1
    assert re.search(r"running\s+3\.3 s\s+c\s+attempt 2", text)  # elapsed since its first attempt
    assert any("retrying" in line and "attempt 1: flaky" in line for line in lines)
    assert any("✗ b: E005 boom" in line for line in lines)
    assert lines[0].startswith("p/default r1: running")


def test_render_caps_the_active_list() -> None:
    r = result([task(f"t{i}", TaskStatus.RUNNING) for i in range(25)])
    text = plain(render(r, now=T0))
    assert "… and 15 more active" in text
    assert "t9" in text and "t10 " not in text


def test_changes_report_retries_failures_and_the_end() -> None:
    before = result(
        [task("a", TaskStatus.RUNNING), task("b", TaskStatus.RUNNING), task("c", TaskStatus.RUNNING)]
    )
    after = result(
        [
            task("a", TaskStatus.RETRYING, error_message="attempt 1: stub failed"),
            task(
                "b", TaskStatus.TIMED_OUT, error_code=ErrorCode.TIMEOUT, error_message="timed out after 1 s"
            ),
            task("c", TaskStatus.SUCCEEDED, attempts=3),
        ],
        status=RunStatus.FAILED,
    )
    lines = [t.plain for t in changes(before, after)]
    assert lines[0] == "↻ a retrying: attempt 1: stub failed"
    assert lines[1] == "✗ b timed_out: E002 timed out after 1 s"
    assert lines[2] == "↻ c succeeded on attempt 3"
    assert len(lines) == 3
    assert changes(None, after) == []
    assert changes(after, after) == []


# ------------------------------------------------------------------ end to end


def run_in_pty(
    args: list[str], env: dict[str, str], cwd: Path, size: tuple[int, int] = (40, 120)
) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as stdin, stdout and stderr; its exit code and output."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    proc = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + LIMIT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal's other side is gone
                    break
                if not data:
                    break
                chunks.append(data)
        else:
            raise AssertionError(f"{args} did not end in {LIMIT} s")
        return proc.wait(timeout=LIMIT), b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def terminal_env(home: Path) -> dict[str, str]:
    env = env_for(home)
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES", "CI"):
        env.pop(name, None)
    env["TERM"] = "xterm-256color"
    return env


@pytest.mark.integration
@pytest.mark.slow
def test_run_on_a_terminal_shows_the_live_view_then_the_table(home: Path) -> None:
    quickstart = str(ROOT / "examples" / "quickstart.yaml")
    code, out = run_in_pty([*TASKEXEC, "run", quickstart], terminal_env(home), home.parent)
    assert code == 0, out[-2000:]
    assert "\x1b[" in out  # colours and cursor moves
    assert "\x1b[?25l" in out  # the live view hides the cursor while it draws
    assert "stage 0" in out and "stage 1" in out and "stage 2" in out  # progress rows
    assert "━" in out  # progress bars
    assert "running" in out  # an active task was listed while it ran
    assert "↻ flaky" in out  # the retry of quickstart's flaky task, as it happened
    # The final table: a header, every task, the summary line as its title.
    assert "attempts" in out and "score[8]" in out and "report" in out
    assert "quickstart/default" in out and "succeeded, 12/12" in out.replace("\r\n", " ").replace("  ", " ")
    assert_nothing_left(home)


def runs_in(home: Path) -> list[str]:
    db = home / "taskexec.db"
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return [row[0] for row in conn.execute("select run_id from runs")]
    except sqlite3.Error:
        return []


@pytest.fixture
def long_run(home: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """An embedded `taskexec run` of three chained 1 s tasks, and its run id once submitted."""
    doc = {
        "id": "chain",
        "tasks": [
            {"id": "t1", "handler": "stub", "params": {"delay": 1}},
            {"id": "t2", "handler": "stub", "params": {"delay": 1}, "depends_on": ["t1"]},
            {"id": "t3", "handler": "stub", "params": {"delay": 1}, "depends_on": ["t2"]},
        ],
    }
    plan = home.parent / "chain.yaml"
    plan.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen(
        [*TASKEXEC, "run", str(plan), "--json"],
        env=env_for(home),
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: runs_in(home), timeout=60, what="the run to be submitted")
        yield proc, runs_in(home)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate()


@pytest.mark.integration
@pytest.mark.slow
def test_watch_follows_a_run_in_progress_through_its_events(
    home: Path, long_run: tuple[subprocess.Popen[str], str]
) -> None:
    proc, run_id = long_run
    # The run's events, as any subscriber sees them: on the embedded Redis under home.
    with Client(Settings(home=home, broker_url=None)) as client:
        events_redis = _events_client(client)
        assert events_redis is not None, "watch would not find the running embedded Redis"
        pubsub = events_redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(f"taskexec:run:{run_id}")
        watcher = subprocess.Popen(
            [*TASKEXEC, "watch", run_id],
            env=env_for(home),
            cwd=home.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        events: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + LIMIT
            while time.monotonic() < deadline and not any(
                e["task_id"] is None and e["status"] == "succeeded" for e in events
            ):
                with contextlib.suppress(redis.ConnectionError):  # the run ended and Redis with it
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is not None:
                        events.append(json.loads(msg["data"]))
                        continue
                if proc.poll() is not None:
                    break
        finally:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()
            events_redis.close()
        out, err = watcher.communicate(timeout=LIMIT)
    assert watcher.returncode == 0, err
    # Piped: a line per change as it happens (issue 15), then the result's summary line.
    lines = out.strip().splitlines()
    assert lines[-1].startswith(f"chain/default {run_id}: succeeded, 3/3 succeeded"), out
    assert "t3 running" in lines and "t3 succeeded" in lines, out
    assert "\x1b[" not in out
    seen = {(e["task_id"], e["status"]) for e in events}
    # Every state change of the last task, and the run's end, reached the channel.
    assert {("t3", "queued"), ("t3", "running"), ("t3", "succeeded"), (None, "succeeded")} <= seen, seen
    run_out, run_err = proc.communicate(timeout=LIMIT)
    assert proc.returncode == 0, run_err
    assert json.loads(run_out)[0]["run_id"] == run_id
    assert_nothing_left(home)


@pytest.mark.integration
@pytest.mark.slow
def test_watch_after_the_run_reads_the_store(home: Path) -> None:
    doc = {
        "tasks": [
            {"id": "only", "handler": "stub", "params": {"behavior": "failure"}, "retry": {"max_attempts": 1}}
        ]
    }
    (home.parent / "one.yaml").write_text(yaml.safe_dump(doc))
    p = taskexec(home, "run", str(home.parent / "one.yaml"), "--json")
    assert p.returncode == 1, p.stderr
    [r] = json.loads(p.stdout)
    piped = taskexec(home, "watch", r["run_id"])
    assert piped.returncode == 1 and piped.stdout.startswith(f"{r['plan_id']}/default {r['run_id']}: failed")
    assert "\x1b[" not in piped.stdout
    code, out = run_in_pty([*TASKEXEC, "watch", r["run_id"]], terminal_env(home), home.parent)
    assert code == 1
    assert "\x1b[" in out and "only" in out and "E003" in out  # the summary table, in colour
    assert_nothing_left(home)


def test_the_view_shows_rate_limits_and_slots() -> None:
    from datetime import UTC, datetime

    from rich.console import Console

    from taskexec.live import render
    from taskexec.models import FlowState, LimitState, RunResult, RunStatistics, RunStatus

    now = datetime.now(UTC)
    result = RunResult(run_id="r", plan_id="p", variant="default", status=RunStatus.RUNNING,
                       statistics=RunStatistics(), submitted_at=now)  # fmt: skip
    flow = FlowState(
        limits=[
            LimitState(
                name="llm", scope="global", per_minute=120, burst=10, tokens=0.0, waiting=7, reserved=6.5
            )
        ],
        concurrency=3,
        running=2,
    )
    console = Console(record=True, width=120)
    console.print(render(result, flow=flow))
    text = console.export_text()
    assert "rate limit llm: 0.0/10 tokens, 7 waiting (6.5 reserved; 120/min, global)" in text
    assert "concurrency: 2/3 slots held" in text


# ------------------------------------------------------------------ issue 15


@pytest.mark.integration
def test_watch_piped_prints_each_change_as_it_happens(home: Path) -> None:
    """Issue 15, defect 2: a line per change while the run goes on, not all at its end.

    The run waits at an approval gate: the lines up to the gate come while it cannot end.
    """
    doc = {
        "id": "gated",
        "tasks": [
            {"id": "build", "handler": "stub"},
            {"id": "gate", "handler": "approval", "params": {"message": "Ship it?"}, "depends_on": ["build"]},
            {"id": "after", "handler": "stub", "depends_on": ["gate"]},
        ],
    }
    plan = home.parent / "gated.yaml"
    plan.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen(
        [*TASKEXEC, "run", str(plan), "--json"],
        env=env_for(home),
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    watcher: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: runs_in(home), timeout=60, what="the run to be submitted")
        run_id = runs_in(home)[0]
        watcher = subprocess.Popen(
            [*TASKEXEC, "watch", run_id],
            env=env_for(home),
            cwd=home.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert watcher.stdout is not None
        seen: list[str] = []
        while not any(line.startswith("gate waiting_approval") for line in seen):
            line = watcher.stdout.readline()
            assert line, f"watch ended before the gate: {seen}"
            seen.append(line.strip())
        assert seen[-1] == f"gate waiting_approval: Ship it? (taskexec approve {run_id} gate)"
        p = taskexec(home, "approve", run_id, "gate")
        assert p.returncode == 0, p.stderr
        rest, err = watcher.communicate(timeout=LIMIT)
        assert watcher.returncode == 0, err
        _, run_err = proc.communicate(timeout=LIMIT)
    finally:
        for p_ in (watcher, proc):
            if p_ is not None and p_.poll() is None:
                p_.kill()
                p_.communicate()
    assert proc.returncode == 0, run_err
    lines = seen + rest.strip().splitlines()
    assert lines[0].startswith(f"gated/default {run_id}: ")  # where it stood when watch began
    assert "gate succeeded" in lines and "after succeeded" in lines
    assert lines.index("gate succeeded") < lines.index("after succeeded")
    assert lines[-1].startswith(f"gated/default {run_id}: succeeded, 3/3 succeeded")
    assert "\x1b[" not in rest
    assert_nothing_left(home)


@pytest.mark.integration
def test_watch_on_a_terminal_follows_an_embedded_run(
    home: Path, long_run: tuple[subprocess.Popen[str], str]
) -> None:
    """Issue 15, defect 2: `watch` on a terminal crashed on a run in progress (no broker URL)."""
    proc, run_id = long_run
    code, out = run_in_pty([*TASKEXEC, "watch", run_id], terminal_env(home), home.parent)
    assert "Traceback" not in out and "ValueError" not in out, out[-3000:]
    assert code == 0, out[-2000:]
    assert "\x1b[?25l" in out and "stage 0" in out  # the live view was drawn
    assert "succeeded" in out and "t3" in out  # then the table
    proc.communicate(timeout=LIMIT)
    assert_nothing_left(home)
