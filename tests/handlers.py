"""Python handlers for the integration tests (allowed with ``python:tests``)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any


def echo(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Return params and inputs as they arrived, with the attempt number."""
    return {"params": params, "inputs": inputs, "attempt": ctx.attempt}


def score_by_attempt(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A model call whose output varies: 0.5 on the first attempt, 0.9 afterwards."""
    return {"score": 0.5 if ctx.attempt == 1 else 0.9}


def record_start(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Append the start time and task id to a file, hold for a moment, return."""
    with Path(params["file"]).open("a") as f:
        f.write(f"{time.time()} {ctx.task_id} {os.getpid()}\n")
    time.sleep(float(params.get("delay", 0)))
    return {"ok": True}


def needs_file(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Fail for good unless a file exists: lets a test fix the cause between runs."""
    from taskexec.errors import TaskFailed

    if not Path(params["file"]).exists():
        raise TaskFailed(f"{params['file']} is missing")
    return {"ok": True}


def record_span(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Append 'start end task pid' to a file around a sleep of ``delay`` seconds."""
    start = time.time()
    time.sleep(float(params.get("delay", 0)))
    end = time.time()
    with Path(params["file"]).open("a") as f:
        f.write(f"{start} {end} {ctx.task_id} {os.getpid()}\n")
    return {"ok": True}


# ---------------------------------------------------------------- fault suite


def ledger(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Note the start (pid, attempt), work ``delay`` s, then record the side effect once per task.

    The side effect is a row in ``params["dsn"]``'s ``ledger`` table keyed by ``ctx.task_key``:
    the handler honours the idempotency key, as a real one would with a unique constraint.
    """
    import psycopg2

    with Path(params["starts"]).open("a") as f:
        f.write(f"{time.time()} {os.getpid()} {ctx.attempt} {ctx.task_id}\n")
    end = time.monotonic() + float(params.get("delay", 0))
    while time.monotonic() < end:
        time.sleep(0.05)
    if params.get("crash_after_commit"):
        Path(params["crash_after_commit"]).write_text(str(os.getpid()))
    with psycopg2.connect(params["dsn"]) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO ledger (key, task, attempt) VALUES (%s, %s, %s) ON CONFLICT (key) DO NOTHING",
            (ctx.task_key, ctx.task_id, ctx.attempt),
        )
        cur.execute("INSERT INTO ledger_tries (key, attempt) VALUES (%s, %s)", (ctx.task_key, ctx.attempt))
    conn.close()
    return {"ok": True, "attempt": ctx.attempt, "ledger": True}


def suicide(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Kill the process running it, every time: a poison message."""
    import signal

    with Path(params["starts"]).open("a") as f:
        f.write(f"{time.time()} {os.getpid()} {ctx.attempt} {ctx.task_id}\n")
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def overstay(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Ignore the soft time limit and run ``seconds``: past the broker's visibility timeout."""
    from celery.exceptions import SoftTimeLimitExceeded

    start = time.time()
    end = time.monotonic() + float(params["seconds"])
    while time.monotonic() < end:
        with contextlib.suppress(SoftTimeLimitExceeded):
            time.sleep(0.05)
    with Path(params["file"]).open("a") as f:
        f.write(f"{start} {time.time()} {ctx.task_id} {os.getpid()} {ctx.attempt}\n")
    return {"ok": True}


def _crash_after_commit(**_: Any) -> None:
    """Fault point: a pool process that armed it dies after the task's result was stored
    (the store's commit, the chord's count) and before its worker acknowledges the message."""
    import glob
    import signal

    for marker in glob.glob("/tmp/taskexec-fault-*/crash-armed"):
        path = Path(marker)
        try:
            armed = path.read_text().strip() == str(os.getpid())
        except OSError:
            continue
        if armed:
            path.rename(path.with_name("crash-fired"))
            os.kill(os.getpid(), signal.SIGKILL)


try:
    from celery.signals import task_postrun

    task_postrun.connect(_crash_after_commit, weak=False)
except ImportError:  # pragma: no cover - celery is a dependency
    pass
