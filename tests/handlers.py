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


def _note(params: dict[str, Any], what: str, ctx: Any) -> None:
    """One line of the execution ledger: ``start|end time pid attempt run task`` (appended)."""
    with Path(params["starts"]).open("a") as f:
        f.write(f"{what} {time.time()} {os.getpid()} {ctx.attempt} {ctx.run_id} {ctx.task_id}\n")


def ledger(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Note the start (pid, attempt), work ``delay`` s, record the side effect once per task,
    note the end.

    The start and end lines are the ledger of real executions the fault suite counts: one
    start per attempt that ran, none of them overlapping another of the same task. The side
    effect is a file in ``params["sidefx"]`` named by ``ctx.task_key``, created exclusively:
    the handler honours the idempotency key, as a real one would with a unique constraint.
    It lives outside the store, so that a store outage does not fail the handler itself.
    """
    _note(params, "start", ctx)
    end = time.monotonic() + float(params.get("delay", 0))
    while time.monotonic() < end:
        time.sleep(0.05)
    if params.get("crash_after_commit"):
        Path(params["crash_after_commit"]).write_text(str(os.getpid()))
    if int(params.get("fail_attempts", 0)) >= ctx.attempt:
        _note(params, "end", ctx)
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    effect = Path(params["sidefx"]) / ctx.task_key.replace("/", "__")
    with contextlib.suppress(FileExistsError), effect.open("x") as f:
        f.write(f"{ctx.attempt}\n")
    _note(params, "end", ctx)
    return {"ok": True, "attempt": ctx.attempt, "ledger": True}


def suicide(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Kill the process running it, every time: a poison message."""
    import signal

    _note(params, "start", ctx)
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


_published = {"count": 0}


def _stall_a_publish(**_: Any) -> None:
    """Fault point of the suite's own, in the middle of a publication: the N-th message this
    process publishes after ``stall-publish`` was armed (``N SECONDS``) waits SECONDS first,
    so that the test can restart Redis while a large stage's chord is half sent."""
    import glob

    for marker in glob.glob("/tmp/taskexec-fault-*/stall-publish"):
        path = Path(marker)
        try:
            nth, seconds = path.read_text().split()
        except (OSError, ValueError):
            continue
        _published["count"] += 1
        if _published["count"] >= int(nth):
            try:
                path.rename(path.with_name("stall-publish.fired"))
            except OSError:
                continue
            time.sleep(float(seconds))


try:
    from celery.signals import before_task_publish, task_postrun

    task_postrun.connect(_crash_after_commit, weak=False)
    before_task_publish.connect(_stall_a_publish, weak=False)
except ImportError:  # pragma: no cover - celery is a dependency
    pass
