"""A handler's time limit, counted around the handler alone.

Celery's time limits cover a whole task message: the store reads before the claim and the
writes after the handler too. A database outage then spends the handler's time, and the
soft limit fires inside the store's retry loop, where nothing can record it. taskexec sends
``execute`` without Celery limits and counts the task's ``timeout`` here, from the
handler's first line to its return:

* **soft limit**: at ``timeout`` seconds, :class:`~celery.exceptions.SoftTimeLimitExceeded`
  is raised in the handler (``SIGALRM`` in the pool process's main thread, as Celery's
  own soft limit does with ``SIGUSR1``); the attempt ends ``timed_out`` or is retried;
* **hard limit**: a handler that swallows it and runs ``grace`` seconds more is ended by a
  watchdog thread, which first calls ``on_hard`` (the runner records the timed-out attempt)
  then kills the process, as Celery's hard limit does; the message is delivered again
  (``reject_on_worker_lost``) and finds the attempt recorded.

Outside a main thread (a thread pool, a test calling the runner directly) no signal can
interrupt the handler: the watchdog alone enforces the limit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

from celery.exceptions import SoftTimeLimitExceeded

__all__ = ["HandlerTimeLimit"]

log = logging.getLogger("taskexec.worker")


class HandlerTimeLimit:
    """``with HandlerTimeLimit(timeout, grace, on_hard): handler(...)``.

    Example:
        >>> import time
        >>> try:
        ...     with HandlerTimeLimit(0.05, grace=5.0, on_hard=lambda: None):
        ...         time.sleep(1)
        ... except SoftTimeLimitExceeded:
        ...     print("timed out")
        timed out
    """

    def __init__(self, timeout: float, grace: float, on_hard: Callable[[], None]) -> None:
        self.timeout, self.grace, self.on_hard = timeout, grace, on_hard
        self._armed = False
        self._previous: object = None
        self._watchdog: threading.Timer | None = None
        self._signals = threading.current_thread() is threading.main_thread()

    def _soft(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:  # the handler may have returned between the alarm and this call
            self._armed = False
            raise SoftTimeLimitExceeded(f"soft time limit ({self.timeout:g} s) exceeded")

    def _hard(self) -> None:
        log.error("handler still running %g s after its time limit: ending the process", self.grace)
        try:
            self.on_hard()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self) -> HandlerTimeLimit:
        self._armed = True
        if self._signals:
            self._previous = signal.signal(signal.SIGALRM, self._soft)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
        self._watchdog = threading.Timer(self.timeout + self.grace, self._hard)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._armed = False
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._signals:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)  # type: ignore[arg-type]
