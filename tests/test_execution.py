"""Execution on a real fleet: Redis broker, PostgreSQL store, `taskexec worker` processes."""

from __future__ import annotations

import functools
import itertools
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from celery import _state as celery_state
from sqlalchemy import select

from taskexec import Client, RunResult, RunStatus, TaskStatus, parse_plan
from taskexec.settings import Settings
from taskexec.store import repository as repo
from taskexec.store.tables import ExecutionLog
from tests.conftest import Fleet, wait_for

pytestmark = pytest.mark.integration


def fast_retry(n: int, backoff: float = 0.05, multiplier: float = 1.0) -> dict[str, Any]:
    return {"max_attempts": n, "backoff": backoff, "multiplier": multiplier, "jitter": False}


@pytest.fixture(params=["stages", "dag"])
def client(fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A client whose runs go in each execution mode (``execution: stages``, then ``dag``)."""
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    with Client(settings) as c:
        c.submit = functools.partial(c.submit, execution=request.param)  # type: ignore[method-assign]
        yield c


def run(client: Client, doc: dict[str, Any], timeout: float = 90) -> RunResult:
    handle = client.submit(parse_plan(doc))
    result = handle.wait(timeout=timeout)
    assert result.status.terminal, f"run still {result.status} after {timeout} s"
    return result


def by_id(result: RunResult) -> dict[str, Any]:
    return {t.id: t for t in result.tasks}


def transitions(client: Client, run_id: str, task_id: str) -> list[tuple[str | None, datetime]]:
    with client.store.begin() as s:
        rows = s.execute(
            select(ExecutionLog.to_status, ExecutionLog.at)
            .where(ExecutionLog.run_id == run_id, ExecutionLog.task_id == task_id)
            .order_by(ExecutionLog.id)
        )
        return [(r[0], r[1]) for r in rows]


def test_three_stages_of_fifty(client: Client) -> None:
    doc = {
        "tasks": [
            {
                "id": "a",
                "handler": "stub",
                "matrix": {"strategy": "cartesian", "params": {"i": list(range(50))}},
            },
            {
                "id": "b",
                "handler": "stub",
                "depends_on": ["a"],
                "matrix": {"strategy": "cartesian", "params": {"i": list(range(50))}},
            },
            {
                "id": "c",
                "handler": "stub",
                "depends_on": ["b"],
                "matrix": {"strategy": "cartesian", "params": {"i": list(range(50))}},
            },
        ]
    }
    r = run(client, doc)
    assert r.status is RunStatus.SUCCEEDED
    assert r.statistics.total == 150 and r.statistics.succeeded == 150
    stages: dict[int, list[Any]] = {}
    for t in r.tasks:
        stages.setdefault(t.stage, []).append(t)
    for k in (1, 2):
        assert min(t.started_at for t in stages[k]) >= max(t.finished_at for t in stages[k - 1])


def test_artifacts_flow_through_the_store(client: Client) -> None:
    doc = {
        "tasks": [
            {"id": "a", "handler": "stub", "output": "data", "params": {"output": {"rows": 3}}},
            {
                "id": "m",
                "handler": "python:tests.handlers:echo",
                "depends_on": ["a"],
                "inputs": ["data"],
                "output": "cases",
                "matrix": {"strategy": "cartesian", "params": {"k": [1, 2]}},
            },
            {
                "id": "z",
                "handler": "python:tests.handlers:echo",
                "depends_on": ["m"],
                "inputs": ["cases", "data"],
            },
        ]
    }
    r = run(client, doc)
    assert r.status is RunStatus.SUCCEEDED, r
    z = by_id(r)["z"].output
    assert z["inputs"]["data"] == {"rows": 3}
    assert [c["params"]["k"] for c in z["inputs"]["cases"]] == [1, 2]  # fan-in in case order


def test_retry_counts_and_backoff_spacing(client: Client) -> None:
    doc = {
        "tasks": [
            {
                "id": "flaky",
                "handler": "stub",
                "retry": fast_retry(3, backoff=0.4, multiplier=2.0),
                "params": {"fail_attempts": 2},
            }
        ]
    }
    r = run(client, doc)
    t = by_id(r)["flaky"]
    assert t.status is TaskStatus.SUCCEEDED and t.attempts == 3
    assert r.statistics.retries == 2
    starts = [at for status, at in transitions(client, r.run_id, "flaky") if status == "running"]
    assert len(starts) == 3
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.8, gaps  # backoff 0.4 s, then 0.8 s


def test_failures_exhaust_attempts_and_skip_downstream(client: Client) -> None:
    doc = {
        "defaults": {"retry": fast_retry(2)},
        "tasks": [
            {"id": "ok", "handler": "stub"},
            {"id": "bad", "handler": "stub", "params": {"behavior": "failure"}},
            {"id": "boom", "handler": "stub", "retry": {"max_attempts": 1}, "params": {"behavior": "error"}},
            {
                "id": "final",
                "handler": "python:tests.handlers:needs_file",
                "params": {"file": "/nonexistent"},
            },
            {"id": "after_bad", "handler": "stub", "depends_on": ["bad"]},
            {"id": "after_after", "handler": "stub", "depends_on": ["after_bad"]},
            {"id": "independent", "handler": "stub", "depends_on": ["ok"]},
        ],
    }
    r = run(client, doc)
    t = by_id(r)
    assert r.status is RunStatus.FAILED
    assert (t["bad"].status, t["bad"].attempts, t["bad"].error_code) == (TaskStatus.FAILED, 2, "E005")
    assert (t["boom"].status, t["boom"].error_code) == (TaskStatus.ERROR, "E003")
    assert (t["final"].status, t["final"].attempts, t["final"].error_code) == (TaskStatus.FAILED, 1, "E003")
    for k in ("after_bad", "after_after"):
        assert (t[k].status, t[k].error_code) == (TaskStatus.SKIPPED, "E009")
    assert t["independent"].status is TaskStatus.SUCCEEDED


def test_timeout_is_enforced_and_retried(client: Client) -> None:
    doc = {
        "tasks": [
            {"id": "slow", "handler": "stub", "timeout": 1, "retry": fast_retry(2), "params": {"delay": 30}}
        ]
    }
    r = run(client, doc, timeout=60)
    t = by_id(r)["slow"]
    assert (t.status, t.error_code, t.attempts) == (TaskStatus.TIMED_OUT, "E002", 2)
    assert r.statistics.duration_seconds is not None and r.statistics.duration_seconds < 20


def test_validation_re_executes_until_criteria_are_met(client: Client) -> None:
    crit = [{"path": "score", "op": ">=", "value": 0.8}]
    doc = {
        "defaults": {"retry": fast_retry(2)},
        "tasks": [
            {"id": "varies", "handler": "python:tests.handlers:score_by_attempt", "validate": crit},
            {"id": "poor", "handler": "stub", "params": {"output": {"score": 0.5}}, "validate": crit},
            {"id": "broken", "handler": "stub", "params": {"output": {"score": "high"}}, "validate": crit},
        ],
    }
    r = run(client, doc)
    t = by_id(r)
    assert (t["varies"].status, t["varies"].attempts) == (TaskStatus.SUCCEEDED, 2)
    assert (t["poor"].status, t["poor"].attempts, t["poor"].error_code) == (
        TaskStatus.VALIDATION_FAILED,
        2,
        "E008",
    )
    assert (t["broken"].status, t["broken"].error_code) == (TaskStatus.ERROR, "E007")


def test_stop_after_max_failures_cancels_the_rest(client: Client) -> None:
    fail = {"handler": "stub", "params": {"behavior": "failure"}}
    doc = {
        "defaults": {"retry": {"max_attempts": 1}},
        "stop": {"max_failures": 2},
        "tasks": [
            {"id": "f1", **fail},
            {"id": "f2", **fail},
            {"id": "f3", **fail},
            {"id": "ok", "handler": "stub"},
            {"id": "later", "handler": "stub", "depends_on": ["ok"]},
        ],
    }
    r = run(client, doc)
    assert r.status is RunStatus.FAILED
    assert (by_id(r)["later"].status, by_id(r)["later"].error_code) == (TaskStatus.CANCELLED, "E004")


def test_run_timeout_stops_the_run(client: Client) -> None:
    doc = {
        "stop": {"timeout": 1},
        "tasks": [
            {"id": "a", "handler": "stub", "params": {"delay": 1.5}},
            {"id": "b", "handler": "stub", "depends_on": ["a"]},
        ],
    }
    r = run(client, doc)
    assert r.status is RunStatus.TIMED_OUT
    assert by_id(r)["b"].status is TaskStatus.CANCELLED


def test_cancel_mid_run(client: Client) -> None:
    doc = {
        "tasks": [{"id": f"long{i}", "handler": "stub", "params": {"delay": 20}} for i in range(5)]
        + [{"id": "tail", "handler": "stub", "depends_on": ["long0"]}]
    }
    handle = client.submit(parse_plan(doc))
    wait_for(
        lambda: (
            handle.status().statistics.running >= 2
            and any(t.status is TaskStatus.RUNNING for t in handle.status().tasks)
        ),
        what="tasks running",
    )
    handle.cancel()
    r = handle.wait(timeout=15)
    assert r.status is RunStatus.CANCELLED
    assert all(t.status is TaskStatus.CANCELLED and t.error_code == "E004" for t in r.tasks), r.tasks
    assert by_id(r)["tail"].attempts == 0


def test_resume_after_the_broker_lost_everything(client: Client, fleet: Fleet) -> None:
    doc = {
        "tasks": [
            {"id": "a", "handler": "stub", "params": {"delay": 0.1}},
            {
                "id": "slow",
                "handler": "stub",
                "depends_on": ["a"],
                "matrix": {"strategy": "cartesian", "params": {"i": list(range(6))}},
                "params": {"delay": 1.5},
            },
            {"id": "z", "handler": "stub", "depends_on": ["slow"]},
        ]
    }
    handle = client.submit(parse_plan(doc))
    wait_for(lambda: by_id(handle.status())["slow[0]"].status is TaskStatus.RUNNING, what="stage 1 running")
    for p in fleet.procs:  # the fleet goes down with the broker's state
        fleet.kill(p)
        p.wait(timeout=10)
    with redis.Redis.from_url(fleet.env["TASKEXEC_BROKER_URL"]) as r:
        r.flushdb()
    fleet.procs.clear()
    fleet.start("executor,validator", concurrency=2)
    assert client.resume(handle.run_id) >= 1
    r = handle.wait(timeout=60)
    assert r.status is RunStatus.SUCCEEDED, [(t.id, t.status) for t in r.tasks]
    assert by_id(r)["a"].attempts == 1  # finished tasks are not run again


def test_a_duplicate_execute_message_changes_nothing(client: Client) -> None:
    r = run(client, {"tasks": [{"id": "once", "handler": "python:tests.handlers:echo"}]})
    before = by_id(r)["once"]
    # taskexec keeps no Celery results: this message asks for its own, to know it was handled,
    # read with a plain GET. Sent as a worker sends (join-will-block): a producer would also
    # subscribe to the result's channel, and the result's __del__ would reconnect to Redis
    # after the client closed (a leaked socket).
    app = client.app
    celery_state._set_task_join_will_block(True)
    try:
        sent = app.send_task(
            "taskexec.execute", args=(r.run_id, "once"), queue="executor", ignore_result=False
        ).id
    finally:
        celery_state._set_task_join_will_block(False)
    wait_for(lambda: app.backend.get_task_meta(sent)["status"] == "SUCCESS", what="the copy handled")
    after = by_id(client.status(r.run_id))["once"]
    assert (after.status, after.attempts, after.output) == (before.status, 1, before.output)
    with client.store.begin() as s:
        assert [st for st, _ in transitions(client, r.run_id, "once")].count("running") == 1
        assert repo.get_run(s, r.run_id).status == "succeeded"


def test_execute_runs_one_task_synchronously(client: Client) -> None:
    done = client.execute("shell", {"argv": [sys.executable, "-c", "print('hi')"]}, timeout=30)
    assert (done.status, done.attempts) == (TaskStatus.SUCCEEDED, 1)
    assert done.output["stdout"].strip() == "hi"
    failed = client.execute("stub", {"behavior": "failure"}, timeout=30)
    assert (failed.status, failed.error_code) == (TaskStatus.FAILED, "E003")
    kind = f"probe-{uuid.uuid4().hex[:8]}"  # the fleet (and its store) serves both modes' runs
    listed = client.runs(label=("kind", kind))
    assert listed == []
    client.execute("stub", labels={"kind": kind}, tenant="team-a")
    [probe] = client.runs(label=("kind", kind))
    assert probe.tenant == "team-a" and probe.plan_id == "execute"


def test_workers_enforce_their_own_allow_list(client: Client, fleet: Fleet) -> None:
    producer = fleet.settings()
    assert isinstance(producer, Settings)
    # A producer that allows more than the workers do: the workers decide.
    lenient = producer.model_copy(update={"allowed_handlers": [*producer.allowed_handlers, "python:json"]})
    with Client(lenient) as other:
        r = other.submit(parse_plan({"tasks": [{"id": "x", "handler": "python:json:dumps"}]})).wait(
            timeout=60
        )
    [task] = r.tasks
    assert (task.status, task.error_code) == (TaskStatus.ERROR, "E010")
    assert "not allowed on this worker" in (task.error_message or "")


def test_malformed_messages_are_refused_and_the_worker_goes_on(client: Client, fleet: Fleet) -> None:
    for name, args in (
        ("taskexec.execute", ("no-such-run", "x")),
        ("taskexec.execute", (1,)),
        ("taskexec.validate", ({"bogus": True},)),
        ("taskexec.validate", ("not a record",)),
        ("taskexec.advance", ("no-such-run", "one")),
    ):
        client.app.send_task(name, args=args, queue="control" if name == "taskexec.advance" else None)
    logs = lambda: "".join(p.read_text(errors="replace") for p in fleet.logs.glob("*.log"))  # noqa: E731
    wait_for(lambda: logs().count("refused") >= 3, what="the malformed messages refused")
    assert run(client, {"tasks": [{"id": "ok", "handler": "stub"}]}).status is RunStatus.SUCCEEDED
    assert all(p.poll() is None for p in fleet.procs), "no worker died"
