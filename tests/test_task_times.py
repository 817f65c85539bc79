"""Task times (issue 15, defect 12): execution time (the attempts' handler time, the pauses
between them left out) apart from wall time, and the elapsed time of tasks not yet ended,
as the store reads them back and as the reports show them."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from datetime import timedelta

import pytest
from rich.console import Console

from taskexec import report
from taskexec.models import RunManifest, TaskResult, TaskStatus
from taskexec.plan import compile_plan, parse_plan
from taskexec.store import repository as repo
from taskexec.store.engine import Store
from taskexec.store.results import run_result
from taskexec.store.tables import utcnow


def _manifest() -> RunManifest:
    plan = parse_plan(
        "tasks: [{id: load, handler: stub}, {id: busy, handler: stub}, {id: gate, handler: stub},"
        " {id: later, handler: stub}]"
    )
    [m] = compile_plan(plan)
    return m


def test_execution_time_leaves_out_the_pause_between_attempts_and_running_tasks_show_elapsed(
    store: Store,
) -> None:
    t0 = utcnow() - timedelta(seconds=60)
    lease = t0 + timedelta(hours=1)
    with store.begin() as s:
        repo.add_run(s, "r1", _manifest(), now=t0)
        for tid in ("load", "busy", "gate"):
            repo.set_task_status(s, "r1", tid, TaskStatus.QUEUED)
        # load: two attempts of 50 ms, 7 s apart (the retry's backoff).
        a1 = repo.claim_attempt(s, "r1", "load", "w", lease_until=lease, now=t0)
        repo.record_metrics(s, "r1", "load", 1, {"duration_seconds": 0.05})
        repo.set_task_status(s, "r1", "load", TaskStatus.RETRYING, attempt=a1, not_before=t0)
        a2 = repo.claim_attempt(s, "r1", "load", "w", lease_until=lease, now=t0 + timedelta(seconds=7.2))
        repo.record_metrics(s, "r1", "load", 2, {"duration_seconds": 0.07})
        repo.set_task_status(
            s, "r1", "load", TaskStatus.SUCCEEDED, attempt=a2, finished_at=t0 + timedelta(seconds=7.32)
        )
        # busy: running for about 60 s; gate: waiting at an approval gate for about 60 s.
        repo.claim_attempt(s, "r1", "busy", "w", lease_until=lease, now=t0)
        a = repo.claim_attempt(s, "r1", "gate", "w", lease_until=lease, now=t0)
        repo.set_task_status(s, "r1", "gate", TaskStatus.WAITING_APPROVAL, attempt=a)
    with store.begin() as s:
        result = run_result(s, "r1")
    tasks = {t.id: t for t in result.tasks}

    load = tasks["load"]
    assert load.execution_seconds == pytest.approx(0.12)
    assert load.wall_seconds == pytest.approx(7.32)
    busy, gate, later = tasks["busy"], tasks["gate"], tasks["later"]
    assert busy.wall_seconds is not None and busy.wall_seconds >= 59
    assert busy.execution_seconds is not None and busy.execution_seconds >= 59
    assert gate.wall_seconds is not None and gate.wall_seconds >= 59
    assert later.wall_seconds is None and later.execution_seconds is None  # never started

    # results --format json carries both.
    data = json.loads(report.to_json(result))
    by_id = {t["id"]: t for t in data["tasks"]}
    assert by_id["load"]["execution_seconds"] == pytest.approx(0.12)
    assert by_id["load"]["wall_seconds"] == pytest.approx(7.32)

    # JUnit: a test case's time is its execution time.
    root = ET.fromstring(report.to_junit([result]).split("?>", 1)[1])
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases["load"].get("time") == "0.120"

    # The results table: execution time apart from wall time; no 0.00 s for a running task.
    buf = io.StringIO()
    report.render_table(result, Console(file=buf, width=200))
    lines = {line.split("│")[1].strip(): line for line in buf.getvalue().splitlines() if line.count("│") > 3}
    assert "0.12 s" in lines["load"] and "7.32 s" in lines["load"]
    assert "0.00 s" not in lines["busy"] and "0.00 s" not in lines["gate"]

    # The HTML timeline shows both too.
    page = report.to_html([result])
    assert "0.12 s" in page and "7.32 s" in page


def test_results_without_the_new_fields_still_report_their_wall_time() -> None:
    """Results stored before execution_seconds existed (or built by hand) keep working."""
    t0 = utcnow()
    t = TaskResult(
        id="a", status=TaskStatus.SUCCEEDED, started_at=t0, finished_at=t0 + timedelta(seconds=2.5)
    )
    assert t.execution_seconds is None and t.wall_seconds is None
    assert TaskResult.model_validate_json(t.model_dump_json()) == t
