"""The ``shell`` handler: run a command, its inputs as a JSON object on stdin.

Params: ``argv`` (a list, no shell involved), ``env`` (added to the worker's environment
without its ``TASKEXEC_*`` variables, which may hold credentials), ``cwd``, ``timeout``
(seconds, at most the task's), ``parse_json`` (stdout is a JSON value: add it to the output
as ``json``). The command also gets ``TASKEXEC_RUN_ID``, ``TASKEXEC_TASK_ID``,
``TASKEXEC_ATTEMPT``, ``TASKEXEC_IDEMPOTENCY_KEY`` and ``TASKEXEC_PARAMS``: the task's other
params as a JSON object (a matrix case's values, a variant's overlay).

Output: ``{"exit_code", "stdout", "stderr"}`` (each stream cut at 1 MiB). A non-zero exit
is an execution error (E003), retried while attempts remain. The command runs in its own
process group, killed with it when the task times out or the run is cancelled, and killed
by the kernel if the worker process running it dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskexec.errors import ParamsError, RetryableError, TaskCancelled, TaskFailed
from workers.handlers.registry import HandlerContext, handler

__all__ = ["ShellParams", "shell"]

MAX_STREAM = 1024 * 1024
_PR_SET_PDEATHSIG = 1


class ShellParams(BaseModel):
    """The params of ``shell``; matrix params may sit beside them and are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = Field(None, gt=0)
    parse_json: bool = False


#: The params the handler itself reads; the rest go to the command in ``TASKEXEC_PARAMS``.
_OWN = frozenset(ShellParams.model_fields)


def _die_with_worker() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A pool process SIGKILLed (hard time limit, lost worker) cannot kill its command's
    # process group; the kernel does, when the parent dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _text(data: bytes) -> str:
    if len(data) > MAX_STREAM:
        return data[:MAX_STREAM].decode("utf-8", "replace") + f"\n[... {len(data) - MAX_STREAM} bytes cut]"
    return data.decode("utf-8", "replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@handler("shell")
def shell(params: dict[str, Any], inputs: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Run ``argv`` with the inputs on stdin; fail (retryably) on a non-zero exit."""
    try:
        p = ShellParams.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        raise ParamsError(f"shell param {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    env.update(
        TASKEXEC_RUN_ID=ctx.run_id,
        TASKEXEC_TASK_ID=ctx.task_id,
        TASKEXEC_ATTEMPT=str(ctx.attempt),
        TASKEXEC_IDEMPOTENCY_KEY=ctx.idempotency_key,
        TASKEXEC_PARAMS=json.dumps({k: v for k, v in params.items() if k not in _OWN}),
    )
    env.update(p.env)
    try:
        proc = subprocess.Popen(
            p.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=p.cwd,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_worker,  # noqa: PLW1509 - only prctl, async-signal-safe
        )
    except OSError as e:
        raise ParamsError(f"cannot start {p.argv[0]!r}: {e.strerror or e}") from None
    stdin: bytes | None = json.dumps(inputs).encode()
    limit = min(p.timeout or ctx.timeout, ctx.timeout)
    waited = 0.0
    try:
        while True:
            try:
                out, errs = proc.communicate(stdin, timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                stdin = None  # sent already; communicate keeps the rest of the exchange
                waited += 0.5
                if ctx.is_cancelled():
                    raise TaskCancelled("the run was cancelled") from None
                if waited >= limit:
                    raise RetryableError(f"{p.argv[0]} did not finish in {limit:g} s") from None
    finally:
        if proc.poll() is None:
            _kill(proc)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:  # a long-lived worker must not leak one fd per killed command
                pipe.close()
    stderr = _text(errs)
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or [""]
        raise RetryableError(f"{p.argv[0]} exited {proc.returncode}: {tail[0][:300]}")
    result: dict[str, Any] = {"exit_code": proc.returncode, "stdout": _text(out), "stderr": stderr}
    if p.parse_json:
        try:
            result["json"] = json.loads(out)
        except ValueError as e:
            raise TaskFailed(f"{p.argv[0]}: stdout is not JSON ({e})") from None
    return result
