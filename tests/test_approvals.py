"""Approval gates and reruns of failed work, on real workers, Redis and PostgreSQL."""

from __future__ import annotations

import functools
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from taskexec import Client, RunStatus, TaskStatus, parse_plan, report
from taskexec.errors import ConflictError, InvalidInputError
from taskexec.settings import Settings
from taskexec.store.tables import ExecutionLog
from tests.conftest import ROOT, Fleet, make_fleet_env, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(redis_db: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("approvals")
    env = {**make_fleet_env(redis_db, pg_url, tmp / "home"), "TASKEXEC_RECONCILE_INTERVAL": "1"}
    f = Fleet(env, tmp)
    try:
        f.start_many(("executor", 2, "exec"), ("validator", 1, "val"))
        yield f
    finally:
        f.stop()


@pytest.fixture(params=["stages", "dag"])
def client(fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A client whose runs go in each execution mode (``execution: stages``, then ``dag``)."""
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    with Client(settings) as c:
        c.submit = functools.partial(c.submit, execution=request.param)  # type: ignore[method-assign]
        yield c


def by_id(client: Client, run_id: str) -> dict[str, Any]:
    return {t.id: t for t in client.status(run_id).tasks}


def gated(**gate_params: Any) -> dict[str, Any]:
    """A gate holding `deploy`, beside a three-stage branch that does not depend on it."""
    return {
        "tasks": [
            {"id": "gate", "handler": "approval", "params": {"message": "ship it?", **gate_params}},
            {
                "id": "deploy",
                "handler": "stub",
                "depends_on": ["gate"],
                "params": {"output": {"deployed": True}},
            },
            {"id": "build", "handler": "stub", "params": {"delay": 0.2}},
            {"id": "test", "handler": "stub", "depends_on": ["build"]},
            {"id": "report", "handler": "stub", "depends_on": ["test"]},
        ]
    }


def test_a_gate_holds_its_branch_only_and_no_worker(client: Client) -> None:
    handle = client.submit(parse_plan(gated()))
    wait_for(
        lambda: by_id(client, handle.run_id)["report"].status is TaskStatus.SUCCEEDED,
        what="the free branch done",
    )
    tasks = by_id(client, handle.run_id)
    assert tasks["gate"].status is TaskStatus.WAITING_APPROVAL
    assert tasks["gate"].output == {"approval": {"message": "ship it?", "deadline": None}}
    assert tasks["deploy"].status is TaskStatus.PENDING
    assert handle.status().status is RunStatus.RUNNING

    def idle() -> bool:  # the last stage's bookkeeping ends; then nothing holds a worker
        active = client.app.control.inspect(timeout=1.0).active() or {}
        return bool(active) and all(not jobs for jobs in active.values())

    wait_for(idle, timeout=30, what="every worker idle while the gate waits")
    assert by_id(client, handle.run_id)["gate"].status is TaskStatus.WAITING_APPROVAL

    assert client.approve(handle.run_id, "gate", by="ana", reason="staging is green") is TaskStatus.SUCCEEDED
    result = handle.wait(timeout=60)
    assert result.status is RunStatus.SUCCEEDED
    gate = next(t for t in result.tasks if t.id == "gate")
    assert gate.output is not None and (gate.output["by"], gate.output["reason"]) == (
        "ana",
        "staging is green",
    )
    with client.store.begin() as s:
        logged = s.scalars(
            select(ExecutionLog.message).where(
                ExecutionLog.run_id == handle.run_id, ExecutionLog.event == "approval"
            )
        ).all()
    assert logged == ["approved by ana: staging is green"]
    with pytest.raises(ConflictError, match="not waiting for approval"):
        client.approve(handle.run_id, "gate")


def test_a_rejection_fails_the_gate_and_skips_its_branch(client: Client) -> None:
    handle = client.submit(parse_plan(gated()))
    wait_for(
        lambda: by_id(client, handle.run_id)["gate"].status is TaskStatus.WAITING_APPROVAL, what="the gate"
    )
    client.approve(handle.run_id, "gate", reject=True, reason="not today", by="bo")
    result = handle.wait(timeout=60)
    tasks = {t.id: t for t in result.tasks}
    assert result.status is RunStatus.FAILED
    assert (tasks["gate"].status, tasks["gate"].error_code) == (TaskStatus.FAILED, "E012")
    assert tasks["gate"].error_message == "rejected by bo: not today"
    assert (tasks["deploy"].status, tasks["deploy"].error_code) == (TaskStatus.SKIPPED, "E009")
    assert tasks["report"].status is TaskStatus.SUCCEEDED
    junit = ET.fromstring(report.to_junit([result]))
    [failure] = junit.findall(".//testcase[@name='gate']/failure")
    assert failure.get("type") == "E012" and "not today" in (failure.get("message") or "")


def test_an_approval_timeout_rejects_the_gate(client: Client) -> None:
    handle = client.submit(parse_plan(gated(timeout=1)))
    result = handle.wait(timeout=60)
    gate = next(t for t in result.tasks if t.id == "gate")
    assert (gate.status, gate.error_code) == (TaskStatus.FAILED, "E012")
    assert "no decision in time" in (gate.error_message or "")


def test_cancel_ends_a_run_waiting_for_approval(client: Client) -> None:
    handle = client.submit(parse_plan(gated()))
    wait_for(
        lambda: by_id(client, handle.run_id)["gate"].status is TaskStatus.WAITING_APPROVAL, what="the gate"
    )
    handle.cancel()
    result = handle.wait(timeout=30)
    assert result.status is RunStatus.CANCELLED
    tasks = {t.id: t.status for t in result.tasks}
    assert tasks["gate"] is TaskStatus.CANCELLED and tasks["deploy"] is TaskStatus.CANCELLED


def test_retry_turns_a_failed_run_into_a_succeeded_one(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "fixed"
    doc = {
        "defaults": {"retry": {"max_attempts": 2, "backoff": 0.05, "jitter": False}},
        "tasks": [
            {"id": "a", "handler": "stub"},
            {
                "id": "b",
                "handler": "python:tests.handlers:needs_file",
                "depends_on": ["a"],
                "params": {"file": str(marker)},
            },
            {"id": "c", "handler": "stub", "depends_on": ["b"]},
            {"id": "flaky", "handler": "stub", "params": {"fail_attempts": 2}},
        ],
    }
    handle = client.submit(parse_plan(doc))
    first = handle.wait(timeout=60)
    tasks = {t.id: t for t in first.tasks}
    assert first.status is RunStatus.FAILED
    assert (tasks["b"].status, tasks["c"].status, tasks["flaky"].status) == (
        TaskStatus.FAILED,
        TaskStatus.SKIPPED,
        TaskStatus.FAILED,
    )
    marker.touch()  # the cause is fixed
    assert sorted(client.retry(handle.run_id)) == ["b", "c", "flaky"]
    second = handle.wait(timeout=60)
    tasks = {t.id: t for t in second.tasks}
    assert second.status is RunStatus.SUCCEEDED, second.tasks
    assert tasks["a"].attempts == 1, "succeeded tasks are kept, not run again"
    assert tasks["b"].attempts == 2 and tasks["flaky"].attempts == 3, "attempt numbers keep counting"
    with client.store.begin() as s:
        history = s.scalars(
            select(ExecutionLog.to_status)
            .where(ExecutionLog.run_id == handle.run_id, ExecutionLog.task_id == "flaky")
            .order_by(ExecutionLog.id)
        ).all()
    assert history.count("running") == 3 and "failed" in history and history[-1] == "succeeded"


def test_retry_of_named_tasks_and_its_errors(client: Client, fleet: Fleet) -> None:
    bad = {"id": "bad", "handler": "stub", "retry": {"max_attempts": 1}, "params": {"behavior": "failure"}}
    doc = {"tasks": [{"id": "ok", "handler": "stub"}, bad]}
    handle = client.submit(parse_plan(doc))
    assert handle.wait(timeout=60).status is RunStatus.FAILED
    with pytest.raises(InvalidInputError, match="'ok' is succeeded"):
        client.retry(handle.run_id, ["ok"])
    with pytest.raises(InvalidInputError, match="no task 'nope'"):
        client.retry(handle.run_id, ["nope"])
    env = {**fleet.env, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "taskexec.cli", *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)

    p = cli("retry", handle.run_id, "--task", "bad")
    assert p.returncode == 0 and "1 task(s) run again: bad" in p.stdout, p.stderr
    again = handle.wait(timeout=60)
    assert (
        next(t for t in again.tasks if t.id == "bad").attempts == 2
    )  # it fails again: the stub has not changed
    p = cli("approve", handle.run_id, "ok")
    assert p.returncode == 2 and "not waiting for approval" in p.stderr and "Traceback" not in p.stderr
