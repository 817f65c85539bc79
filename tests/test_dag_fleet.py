"""``execution: dag`` on a real fleet: what dag promises beyond what both modes share.

The acceptance checks (``tests/test_execution.py``, ``tests/test_approvals.py``) and the
fault suite run in both modes; here, what only dag does: a task starts when its own
upstream tasks end, before the rest of its stage has; a failure skips (E009) its
downstream while another branch still runs; ``taskexec submit --execution dag``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskexec import Client, RunStatus, TaskStatus, parse_plan
from taskexec.models import TaskResult
from taskexec.settings import Settings
from taskexec.store.manifests import compiled_run
from tests.conftest import ROOT, Fleet, wait_for
from tests.test_embedded import LIMIT, assert_nothing_left, env_for, home  # noqa: F401 - a fixture
from tests.test_flow_control import assert_within_limit

pytestmark = pytest.mark.integration


@pytest.fixture
def client(fleet: Fleet) -> Iterator[Client]:
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    with Client(settings) as c:
        yield c


def by_id(tasks: list[TaskResult]) -> dict[str, TaskResult]:
    return {t.id: t for t in tasks}


def test_a_task_starts_when_its_upstream_ends_not_its_stage(client: Client) -> None:
    doc: dict[str, Any] = {
        "execution": "dag",
        "tasks": [
            {"id": "slow", "handler": "stub", "params": {"delay": 3}},
            {"id": "quick", "handler": "stub", "params": {"delay": 0.1}},
            {"id": "after_quick", "handler": "stub", "depends_on": ["quick"]},
            {"id": "after_slow", "handler": "stub", "depends_on": ["slow"]},
            {"id": "last", "handler": "stub", "depends_on": ["after_quick", "after_slow"]},
        ],
    }
    result = client.submit(parse_plan(doc)).wait(timeout=60)
    assert result.status is RunStatus.SUCCEEDED
    t = by_id(result.tasks)
    assert all(x.started_at and x.finished_at for x in t.values())
    # Stage 1's after_quick ran while stage 0's slow was still running.
    assert t["after_quick"].finished_at < t["slow"].finished_at  # type: ignore[operator]
    for task, ups in {
        "after_quick": ["quick"],
        "after_slow": ["slow"],
        "last": ["after_quick", "after_slow"],
    }.items():
        assert all(t[u].finished_at <= t[task].started_at for u in ups)  # type: ignore[operator]


def test_a_failure_skips_its_downstream_while_another_branch_runs(client: Client) -> None:
    doc: dict[str, Any] = {
        "tasks": [
            {"id": "bad", "handler": "stub", "params": {"behavior": "failure"}, "retry": {"max_attempts": 1}},
            {"id": "long", "handler": "stub", "params": {"delay": 4}},
            {"id": "child", "handler": "stub", "depends_on": ["bad"]},
            {"id": "grandchild", "handler": "stub", "depends_on": ["child", "long"]},
        ],
    }
    handle = client.submit(parse_plan(doc), execution="dag")

    def skipped_early() -> bool:
        t = by_id(client.status(handle.run_id).tasks)
        return t["child"].status is TaskStatus.SKIPPED and t["grandchild"].status is TaskStatus.SKIPPED

    wait_for(skipped_early, timeout=30, what="child and grandchild skipped")
    assert by_id(client.status(handle.run_id).tasks)["long"].status is TaskStatus.RUNNING
    result = handle.wait(timeout=60)
    t = by_id(result.tasks)
    assert result.status is RunStatus.FAILED
    assert (t["child"].error_code, t["grandchild"].error_code) == ("E009", "E009")
    assert t["long"].status is TaskStatus.SUCCEEDED


def test_submit_execution_dag_is_recorded_with_the_run(client: Client, fleet: Fleet, tmp_path: Any) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("tasks: [{id: a, handler: stub}, {id: b, handler: stub, depends_on: [a]}]\n")
    p = subprocess.run(
        [sys.executable, "-m", "taskexec.cli", "submit", str(plan), "--execution", "dag"],
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    run_id = p.stdout.split()[0]
    assert client.wait(run_id, timeout=60).status is RunStatus.SUCCEEDED
    with client.store.begin() as s:
        assert compiled_run(s, run_id).manifest.execution == "dag"
    bad = subprocess.run(
        [sys.executable, "-m", "taskexec.cli", "submit", str(plan), "--execution", "fast"],
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert bad.returncode == 2 and "--execution" in bad.stderr and "Traceback" not in bad.stderr


def test_an_embedded_dag_run(home: Path) -> None:  # noqa: F811 - the fixture
    """``taskexec run --execution dag`` without a broker: the embedded fleet runs it."""
    home.mkdir(parents=True)
    plan = home / "plan.yaml"
    plan.write_text(
        "tasks:\n"
        "  - {id: slow, handler: stub, params: {delay: 1.5}}\n"
        "  - {id: quick, handler: stub}\n"
        "  - {id: next, handler: stub, depends_on: [quick]}\n"
        "  - {id: bad, handler: stub, params: {behavior: failure}, depends_on: [quick],\n"
        "     retry: {max_attempts: 1}}\n"
        "  - {id: skipped, handler: stub, depends_on: [bad, slow]}\n"
    )
    p = subprocess.run(
        [sys.executable, "-m", "taskexec.cli", "run", str(plan), "--execution", "dag", "--json"],
        env=env_for(home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert p.returncode == 1, p.stderr  # the run failed: bad
    [result] = json.loads(p.stdout)
    t = {x["id"]: x for x in result["tasks"]}
    assert result["status"] == "failed"
    assert {k: v["status"] for k, v in t.items()} == {
        "slow": "succeeded",
        "quick": "succeeded",
        "next": "succeeded",
        "bad": "failed",
        "skipped": "skipped",
    }
    assert t["skipped"]["error_code"] == "E009"
    assert t["next"]["finished_at"] < t["slow"]["finished_at"]  # not held behind slow's stage
    assert_nothing_left(home)


def test_tasks_released_together_are_paced_at_their_buckets_rate(client: Client, tmp_path: Path) -> None:
    """Twelve rate-limited tasks released at once by their upstream task's end go out with
    ETAs at the bucket's pace: the limit holds, nothing runs twice, waits are not attempts."""
    log = tmp_path / "starts.txt"
    doc: dict[str, Any] = {
        "execution": "dag",
        "rate_limits": {"api": {"per_minute": 240, "burst": 2}},
        "tasks": [
            {"id": "first", "handler": "stub"},
            *(
                {
                    "id": f"t{i}",
                    "handler": "python:tests.handlers:record_start",
                    "rate_limit": "api",
                    "depends_on": ["first"],
                    "params": {"file": str(log)},
                }
                for i in range(12)
            ),
        ],
    }
    result = client.submit(parse_plan(doc)).wait(timeout=90)
    assert result.status is RunStatus.SUCCEEDED
    assert {t.attempts for t in result.tasks} == {1}
    times = sorted(float(line.split()[0]) for line in log.read_text().splitlines())
    assert len(times) == 12
    assert_within_limit(times, 4.0, 2)
