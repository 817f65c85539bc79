"""A timeout is ``timed_out``/E002 whichever limit fired: the task's or the handler's own
(``shell``'s ``params.timeout``). In-process, on the lifecycle harness (SQLite, no workers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import workers.tasks
from taskexec import Settings
from taskexec.models import ErrorCode
from taskexec.run import messages, producer
from taskexec.run import reconcile as reconciler
from taskexec.services import Services
from taskexec.store import Store
from tests.standin import StandinApp
from tests.test_lifecycle import Harness
from workers.runtime import Runtime


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    settings = Settings(
        database_url=url, home=tmp_path, allowed_handlers=["stub", "shell"], outcome_wait_seconds=0
    )
    store = Store(url)
    store.create_all()
    app = StandinApp()
    svc = Services(settings, app, store, None)
    rt = Runtime(svc, worker="standin:1")
    monkeypatch.setattr(producer, "check_broker", lambda redis: None)
    monkeypatch.setattr(messages, "broker_instance", lambda app_: app_.broker_instance())
    monkeypatch.setattr(reconciler, "broker_instance", lambda app_: app_.broker_instance())
    monkeypatch.setattr(workers.tasks, "runtime", lambda: rt)
    try:
        yield Harness(svc, app, rt)
    finally:
        app.close()
        store.close()


def test_a_shell_params_timeout_is_timed_out_e002_and_retried_like_a_task_timeout(harness: Harness) -> None:
    """Issue 15, defect 10: it ended ``failed`` E005 ("sleep did not finish in 1 s")."""
    run_id = harness.started(
        "tasks: [{id: slow, handler: shell, params: {argv: [sleep, '30'], timeout: 1},"
        " retry: {max_attempts: 2, backoff: 0}}]"
    )
    first = harness.execute(run_id, "slow")
    row = harness.tasks(run_id)["slow"]
    assert (first.record["status"], row.attempts, row.error_code) == ("retrying", 1, ErrorCode.TIMEOUT.value)
    harness.execute(run_id, "slow")
    row = harness.tasks(run_id)["slow"]
    assert (row.status, row.attempts, row.error_code) == ("timed_out", 2, ErrorCode.TIMEOUT.value)
    assert row.error_message is not None and "did not finish in 1 s" in row.error_message


def test_a_task_timeout_is_timed_out_e002_too(harness: Harness) -> None:
    run_id = harness.started(
        "tasks: [{id: slow, handler: shell, timeout: 1, params: {argv: [sleep, '30']},"
        " retry: {max_attempts: 1}}]"
    )
    harness.execute(run_id, "slow")
    row = harness.tasks(run_id)["slow"]
    assert (row.status, row.attempts, row.error_code) == ("timed_out", 1, ErrorCode.TIMEOUT.value)
