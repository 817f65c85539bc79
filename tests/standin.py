"""In-process stand-ins for a fleet's broker side: a Celery app that records what it would
send (nothing reaches a broker), and a handler that counts its calls.

Used by ``tests/test_lifecycle.py``: the run's code builds its messages and chords with a
real :class:`celery.Celery` app, whose ``send_task`` (the one call every signature, group
and chord ends in) is replaced by a recorder.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.result import AsyncResult

__all__ = ["Sent", "StandinApp", "calls", "counted"]


@dataclass(frozen=True)
class Sent:
    """One message the app would have sent: task name, args, kwargs and options."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any]

    @property
    def task_id(self) -> str:
        """The message's Celery id (``run/task/epoch`` for an ``execute``; ``""`` if none)."""
        return str(self.options.get("task_id") or "")


@dataclass
class _Control:
    """``app.control``: what was revoked."""

    revoked: list[str] = field(default_factory=list)

    def revoke(self, task_ids: str | list[str], **_: Any) -> None:
        self.revoked.extend([task_ids] if isinstance(task_ids, str) else task_ids)


class StandinApp(Celery):  # type: ignore[misc]
    """A Celery app on ``memory://`` whose messages are recorded in :attr:`sent`, not sent.

    With ``refuse``, every send raises as a broker that is down does.
    """

    def __init__(self, *, refuse: bool = False) -> None:
        super().__init__(
            "taskexec-standin", broker="memory://", backend="cache+memory://", set_as_current=False
        )
        self.conf.update(task_serializer="json", accept_content=["json"])
        self.sent: list[Sent] = []
        self.refuse = refuse
        self._control = _Control()
        self._identity = uuid.uuid4().hex
        self._lock = threading.Lock()

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        if self.refuse:
            raise ConnectionError("the stand-in broker refuses every message")
        json.dumps([args, kwargs])  # a taskexec broker carries JSON only: ids, never objects
        with self._lock:
            self.sent.append(Sent(name, tuple(args or ()), dict(kwargs or {}), options))
        return self.AsyncResult(options.get("task_id") or uuid.uuid4().hex)

    @property
    def control(self) -> _Control:
        return self._control

    @property
    def revoked(self) -> list[str]:
        """Message ids ``app.control.revoke`` was given."""
        return self._control.revoked

    def broker_instance(self) -> str:
        """The broker's identity (what ``messages.broker_instance`` reads from Redis)."""
        return self._identity

    def named(self, name: str) -> list[Sent]:
        """The recorded messages of one task name, in order."""
        return [m for m in self.sent if m.name == name]


#: (run_id, task_id) -> calls of :func:`counted`.
calls: Counter[tuple[str, str]] = Counter()


def counted(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A handler that counts its calls per task (``python:tests.standin:counted``)."""
    calls[(ctx.run_id, ctx.task_id)] += 1
    if ctx.attempt <= int(params.get("fail_attempts", 0)):
        from taskexec.errors import RetryableError

        raise RetryableError(f"attempt {ctx.attempt} fails")
    return {"attempt": ctx.attempt, "calls": calls[(ctx.run_id, ctx.task_id)]}
