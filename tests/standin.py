"""In-process stand-ins for a fleet's broker side: a Celery app that records what it would
send (nothing reaches a broker), and a handler that counts its calls.

The run's code builds its messages and chords with a real :class:`celery.Celery` app,
whose ``send_task`` (the one call every signature, group and chord ends in) is replaced by
a recorder. :func:`harness` puts it together with a SQLite store and one worker's runtime
(``tests/test_lifecycle.py``, ``tests/test_timeouts.py``).
"""

from __future__ import annotations

import contextlib
import json
import textwrap
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult
from sqlalchemy import func, select

import workers.tasks
from taskexec import Settings, TaskStatus, compile_plan, parse_plan
from taskexec.models import ManifestTask, RunManifest
from taskexec.run import messages, producer
from taskexec.run import reconcile as reconciler
from taskexec.run.dispatch import dispatch
from taskexec.services import Services
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.store.manifests import compiled_run
from taskexec.store.tables import Execution, ExecutionLog, Run, utcnow
from workers import runner
from workers.attempt import Outcome
from workers.runtime import Runtime

__all__ = ["Harness", "Sent", "StandinApp", "calls", "counted", "harness", "manifest"]


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


def manifest(text: str, settings: Settings) -> RunManifest:
    """The one manifest of a plan (YAML, indented as it reads best)."""
    [m] = compile_plan(parse_plan(textwrap.dedent(text)), settings)
    return m


@dataclass
class Harness:
    """A store, a recording app and one worker's runtime, in this process."""

    svc: Services
    app: StandinApp
    rt: Runtime

    def submit(self, plan: str) -> str:
        return producer.submit(self.svc, manifest(plan, self.svc.settings))

    def started(self, plan: str) -> str:
        """A run submitted, its first stage dispatched (as a control worker would)."""
        run_id = self.submit(plan)
        dispatch(self.svc, run_id, 0)
        return run_id

    def tasks(self, run_id: str) -> dict[str, Execution]:
        with self.svc.store.begin() as s:
            rows = s.scalars(select(Execution).where(Execution.run_id == run_id)).all()
        return {r.task_id: r for r in rows}

    def claim(self, run_id: str, task_id: str, worker: str = "standin:1", lease: float = 30) -> int | None:
        """Claim a task's next attempt for ``worker``, leased for ``lease`` s (< 0: already out)."""
        with self.svc.store.begin() as s:
            until = utcnow() + timedelta(seconds=lease)
            return repo.claim_attempt(s, run_id, task_id, worker, lease_until=until)

    def task(self, run_id: str, task_id: str) -> ManifestTask:
        with self.svc.store.begin() as s:
            return compiled_run(s, run_id).tasks[task_id]

    def statuses(self, run_id: str) -> dict[str, TaskStatus]:
        return {t: TaskStatus(r.status) for t, r in self.tasks(run_id).items()}

    def run(self, run_id: str) -> Run:
        with self.svc.store.begin() as s:
            return repo.get_run(s, run_id)

    def log_rows(self, run_id: str) -> int:
        with self.svc.store.begin() as s:
            count = s.scalar(
                select(func.count()).select_from(ExecutionLog).where(ExecutionLog.run_id == run_id)
            )
        return int(count or 0)

    def execute(self, run_id: str, task_id: str, *, detached: bool = False) -> Outcome:
        """One delivery of ``taskexec.execute`` to this worker."""
        return runner.execute(self.rt, run_id, task_id, detached=detached)

    def advance(self, run_id: str, stage: int) -> None:
        """The chord body of stage ``stage - 1`` (``taskexec.advance``), run here."""
        workers.tasks.advance(run_id, stage)

    def executed(self, run_id: str) -> list[str]:
        """Task ids of the ``execute`` messages sent for a run, in order."""
        return [m.args[1] for m in self.app.named("taskexec.execute") if m.args[0] == run_id]


@contextlib.contextmanager
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allowed: list[str]) -> Iterator[Harness]:
    """A SQLite store, a recording app and one worker's runtime, handlers ``allowed``."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    settings = Settings(database_url=url, home=tmp_path, allowed_handlers=allowed, outcome_wait_seconds=0)
    store = Store(url)
    store.create_all()
    app = StandinApp()
    svc = Services(settings, app, store, None)
    rt = Runtime(svc, worker="standin:1")
    # Submit pings Redis first; there is none here (a test keeps the real check).
    monkeypatch.setattr(producer, "check_broker", lambda redis: None)
    # publish() asks the broker's Redis for its identity: the stand-in answers.
    monkeypatch.setattr(messages, "broker_instance", lambda app_: app_.broker_instance())
    monkeypatch.setattr(reconciler, "broker_instance", lambda app_: app_.broker_instance())
    monkeypatch.setattr(workers.tasks, "runtime", lambda: rt)
    try:
        yield Harness(svc, app, rt)
    finally:
        app.close()
        store.close()
