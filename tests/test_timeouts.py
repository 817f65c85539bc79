"""A timeout is ``timed_out``/E002 whichever limit fired: the task's or the handler's own
(``shell``'s ``params.timeout``). In-process, on the lifecycle harness (SQLite, no workers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from taskexec.models import ErrorCode
from tests import standin
from tests.standin import Harness


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    with standin.harness(tmp_path, monkeypatch, ["stub", "shell"]) as h:
        yield h


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
