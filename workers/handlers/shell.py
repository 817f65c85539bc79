"""The ``shell`` handler: run a command, its inputs as a JSON object on stdin.

Params: ``argv`` (a list, no shell involved), ``env`` (variables for the command; a
secret as ``{secret: NAME}``), ``cwd``, ``timeout`` (seconds, at most the task's),
``parse_json`` (stdout is JSON and becomes the output: an object as it is, any other value
as ``{"value": ...}``; a step downstream then receives the data itself).

The command's environment is built, not inherited: the worker's holds its credentials
(database URL, broker password, webhook key) and whatever else its host put there (another
team's API key). It gets ``PATH``, ``HOME``, ``LANG``, ``LC_ALL``, ``LC_CTYPE``, ``TZ`` and
``TMPDIR`` when the worker has them, ``TASKEXEC_RUN_ID``, ``TASKEXEC_TASK_ID``,
``TASKEXEC_ATTEMPT``, ``TASKEXEC_IDEMPOTENCY_KEY``, ``TASKEXEC_PARAMS`` (the task's other
params as a JSON object: a matrix case's values, a variant's overlay, resolved secret
params), then its ``env`` param. Nothing else.

A clean environment does not stop a command from reading its parent's:
``/proc/$PPID/environ`` is readable by the same user. With ``TASKEXEC_SHELL_USER`` the
command runs as that user (its own group, no supplementary groups, ``HOME`` its home, in
``/tmp`` unless ``cwd`` says otherwise), so the kernel refuses it the worker's ``/proc``
entries and files. The worker then needs ``CAP_SETUID``/``CAP_SETGID`` to switch and
``CAP_KILL`` to stop the command: ``deploy/`` runs executors as root with only those.

Both streams also go to the attempt's logs (``ctx.emit``), line by line as the command
prints them: ``taskexec logs --follow`` shows a step's output while it runs.

Output: ``{"exit_code", "stdout", "stderr"}`` (each stream cut at 1 MiB), or with
``parse_json`` the JSON that stdout holds. A non-zero exit
is an execution error (E003), retried while attempts remain. A command still running at
``timeout`` ends the attempt ``timed_out`` (E002), as the task's own ``timeout`` does.

The command runs in its own session and process group, which dies with the step: the whole
group is killed when the task times out or the run is cancelled, and what the command left
running when it ended. If the worker process dies (``kill -9``, a hard time limit), the
kernel kills the command (``PR_SET_PDEATHSIG``), and a watchdog in the command's group
(``/bin/sh``, holding the read end of a pipe only the worker process writes to) kills the
rest of the group when the pipe closes: grandchildren are never left to run beside the
takeover of their task. A process that leaves the group (``setsid``, a daemon) escapes.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import errno
import json
import os
import pwd
import select
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskexec.errors import ParamsError, RetryableError, TaskCancelled, TaskFailed
from taskexec.handlers import HandlerContext, HandlerTimedOut, ShellParams, handler, parse_params
from taskexec.settings import Settings

__all__ = ["INHERITED", "ShellParams", "command_env", "shell"]

MAX_STREAM = 1024 * 1024
#: A line of output longer than this is handed to the attempt's logs in pieces.
_LONG_LINE = 64 * 1024
_READ_SIZE = 64 * 1024
#: Seconds between two looks at the run's cancel flag and the step's time limit.
_CHECK_EVERY = 0.5
_PR_SET_PDEATHSIG = 1
#: The worker's variables a command gets (when set): where programs are, locale, time zone.
#: ``_TASKEXEC_EMBEDDED_FLEET`` marks the processes of an embedded fleet, so that its stop
#: finds a command orphaned by a killed pool process (:mod:`taskexec.embedded`); it holds a
#: socket path, nothing secret.
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "_TASKEXEC_EMBEDDED_FLEET")
#: PATH of a command when the worker has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


#: The params the handler itself reads; the rest go to the command in ``TASKEXEC_PARAMS``.
_OWN = frozenset(ShellParams.model_fields)


#: The command group's watchdog: it reads its lifeline (a pipe whose only write end the
#: worker process holds) and, at end of file, kills its whole process group, itself
#: included. The worker closes the lifeline when it is done with the command; the kernel
#: closes it when the worker process dies, even by SIGKILL.
WATCHDOG = ("/bin/sh", "-c", "read -r _; kill -KILL 0")


def _in_child(lifeline: int) -> Callable[[], None]:
    """What the command's process does between fork and exec (after the switch of user)."""

    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        # The command, when the process that started it dies (a parent-death signal set
        # before the switch of user would be reset by it).
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # Its children, which the kernel re-parents instead: a watchdog in the command's own
        # session and group (so the group id stays its own while the watchdog lives), with
        # an empty environment and nothing of the worker's memory (a new program).
        with contextlib.suppress(OSError):
            os.posix_spawn(
                WATCHDOG[0],
                WATCHDOG,
                {},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, lifeline, 0),
                    (os.POSIX_SPAWN_CLOSE, lifeline),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                ],
            )
        os.close(lifeline)

    return setup


@dataclass(frozen=True)
class _RunAs:
    """The user a command runs as (``TASKEXEC_SHELL_USER``)."""

    name: str
    uid: int
    gid: int
    home: str


def _run_as(settings: Settings) -> _RunAs | None:
    who = settings.shell_user
    if who is None:
        return None
    try:
        entry = pwd.getpwuid(int(who)) if who.isdigit() else pwd.getpwnam(who)
    except (KeyError, ValueError):
        raise TaskFailed(f"TASKEXEC_SHELL_USER {who!r} is not a user on this worker") from None
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def command_env(
    worker: dict[str, str] | os._Environ[str], task: dict[str, str], own: dict[str, str], home: str | None
) -> dict[str, str]:
    """A command's whole environment: :data:`INHERITED` from ``worker``, ``task``'s, its ``own``.

    >>> command_env({"PATH": "/bin", "DB_PASSWORD": "x"}, {"TASKEXEC_ATTEMPT": "1"}, {"A": "b"}, None)
    {'PATH': '/bin', 'TASKEXEC_ATTEMPT': '1', 'A': 'b'}
    """
    env = {k: worker[k] for k in INHERITED if k in worker}
    env.setdefault("PATH", DEFAULT_PATH)
    if home is not None:  # another user: its home, a temp dir it may write to
        env["HOME"] = home
        env["TMPDIR"] = tempfile.gettempdir()
    env.update(task)
    env.update(own)
    return env


def _text(data: bytes) -> str:
    if len(data) > MAX_STREAM:
        return data[:MAX_STREAM].decode("utf-8", "replace") + f"\n[... {len(data) - MAX_STREAM} bytes cut]"
    return data.decode("utf-8", "replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class _Lines:
    """One output stream of a command: all of its bytes, and its complete lines handed to
    ``emit`` as they come (a line longer than :data:`_LONG_LINE` in pieces)."""

    def __init__(self, name: str, emit: Callable[[str, str], None]) -> None:
        self.name, self.emit = name, emit
        self.data: list[bytes] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""

    def feed(self, data: bytes) -> None:
        self.data.append(data)
        text = self._partial + self._decoder.decode(data)
        end = text.rfind("\n") + 1
        if end == 0 and len(text) > _LONG_LINE:
            end = len(text)
        if end:
            self.emit(self.name, text[:end])
        self._partial = text[end:]

    def end(self) -> bytes:
        rest = self._partial + self._decoder.decode(b"", final=True)
        if rest:
            self.emit(self.name, rest)
        self._partial = ""
        return b"".join(self.data)


def _exchange(
    proc: subprocess.Popen[bytes], stdin: bytes, ctx: HandlerContext, limit: float
) -> tuple[bytes, bytes]:
    """What ``communicate`` does (stdin written, both streams read to their end, the process
    waited for), with each line handed to ``ctx.emit`` as it comes, and a cancel check and
    the step's time limit every half second."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    argv0 = proc.args[0] if isinstance(proc.args, list) else str(proc.args)
    streams = {
        proc.stdout.fileno(): _Lines("stdout", ctx.emit),
        proc.stderr.fileno(): _Lines("stderr", ctx.emit),
    }
    began = time.monotonic()
    check_at = began + _CHECK_EVERY

    def checked() -> float:
        """Seconds to wait at most before the next check; raises at a cancel or the limit."""
        nonlocal check_at
        now = time.monotonic()
        if now >= check_at:
            check_at = now + _CHECK_EVERY
            if ctx.is_cancelled():
                raise TaskCancelled("the run was cancelled")
            if now - began >= limit:
                raise HandlerTimedOut(f"{argv0} did not finish in {limit:g} s")
        return max(0.0, check_at - now)

    sent = 0
    with selectors.DefaultSelector() as sel:
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        if stdin:
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while any(key.fd in streams for key in sel.get_map().values()):
            for key, _ in sel.select(checked()):
                if key.fd in streams:
                    data = os.read(key.fd, _READ_SIZE)
                    if data:
                        streams[key.fd].feed(data)
                    else:
                        sel.unregister(key.fd)
                    continue
                try:  # stdin: at most PIPE_BUF bytes, which a writable pipe takes without blocking
                    sent += os.write(key.fd, stdin[sent : sent + select.PIPE_BUF])
                except BrokenPipeError:  # the command does not read its input: fine
                    sent = len(stdin)
                if sent >= len(stdin):
                    sel.unregister(key.fd)
                    proc.stdin.close()
    while True:  # both streams closed: the command ends, or has closed them and goes on
        try:
            proc.wait(timeout=max(0.01, checked()))
            break
        except subprocess.TimeoutExpired:
            continue
    return streams[proc.stdout.fileno()].end(), streams[proc.stderr.fileno()].end()


@handler("shell", params=ShellParams)
def shell(params: dict[str, Any], inputs: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Run ``argv`` with the inputs on stdin; fail (retryably) on a non-zero exit."""
    p = parse_params(ShellParams, params, "shell")
    user = _run_as(ctx.settings)
    task = {
        "TASKEXEC_RUN_ID": ctx.run_id,
        "TASKEXEC_TASK_ID": ctx.task_id,
        "TASKEXEC_ATTEMPT": str(ctx.attempt),
        "TASKEXEC_IDEMPOTENCY_KEY": ctx.idempotency_key,
        "TASKEXEC_PARAMS": json.dumps({k: v for k, v in params.items() if k not in _OWN}),
    }
    env = command_env(os.environ, task, p.env, user.home if user else None)
    switch: dict[str, Any] = {}
    if user is not None:
        switch = {"user": user.uid, "group": user.gid, "extra_groups": []}
    cwd = p.cwd if p.cwd or user is None else tempfile.gettempdir()
    lifeline, held = os.pipe()  # both ends not inheritable: the read end is passed on alone
    try:
        proc = subprocess.Popen(
            p.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,  # its own session and process group
            pass_fds=(lifeline,),
            preexec_fn=_in_child(lifeline),  # noqa: PLW1509 - prctl and posix_spawn only
            **switch,
        )
    except PermissionError as e:
        os.close(held)
        # Refused before exec (Python 3.11 then names the cwd, or nothing), with EPERM: the
        # switch of user (chdir and exec refuse with EACCES).
        if user is not None and e.errno == errno.EPERM and e.filename in (None, cwd):
            raise TaskFailed(
                f"this worker cannot run commands as {user.name!r} (TASKEXEC_SHELL_USER): {e.strerror}; "
                "it needs CAP_SETUID and CAP_SETGID"
            ) from None
        raise ParamsError(f"cannot start {p.argv[0]!r}: {e.strerror or e}") from None
    except OSError as e:
        os.close(held)
        raise ParamsError(f"cannot start {p.argv[0]!r}: {e.strerror or e}") from None
    finally:
        os.close(lifeline)
    limit = min(p.timeout or ctx.timeout, ctx.timeout)
    try:
        out, errs = _exchange(proc, json.dumps(inputs).encode(), ctx, limit)
    finally:
        if proc.poll() is None:
            _kill(proc)
        # The watchdog kills what is left of the group: children the command left running.
        os.close(held)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:  # a long-lived worker must not leak one fd per killed command
                pipe.close()
    stderr = _text(errs)
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or [""]
        raise RetryableError(f"{p.argv[0]} exited {proc.returncode}: {tail[0][:300]}")
    if p.parse_json:
        try:
            data = json.loads(out)
        except ValueError as e:
            raise TaskFailed(f"{p.argv[0]}: stdout is not JSON ({e})") from None
        return data if isinstance(data, dict) else {"value": data}
    return {"exit_code": proc.returncode, "stdout": _text(out), "stderr": stderr}
