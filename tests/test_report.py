"""Reports: JUnit XML valid against the schema CI tools accept, the HTML timeline, the table.

The schema is the Jenkins xunit plugin's ``junit-10.xsd`` (see ``tests/data/junit-10.xsd``
for where the copy comes from), validated with ``xmlschema``.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import xmlschema
import yaml
from rich.console import Console

from taskexec import report
from taskexec.models import ErrorCode, RunResult, RunStatistics, RunStatus, TaskResult, TaskStatus
from tests.test_embedded import assert_nothing_left, taskexec

SCHEMA = Path(__file__).parent / "data" / "junit-10.xsd"
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(SCHEMA))


def task(tid: str, status: TaskStatus, seconds: float | None = 1.0, **kw: Any) -> TaskResult:
    return TaskResult(
        id=tid,
        status=status,
        started_at=T0 if seconds is not None else None,
        finished_at=T0 + timedelta(seconds=seconds) if seconds is not None and status.terminal else None,
        **kw,
    )


def run_of(variant: str, tasks: list[TaskResult], status: RunStatus = RunStatus.FAILED) -> RunResult:
    return RunResult(
        run_id=f"run-{variant}",
        plan_id="eval",
        variant=variant,
        status=status,
        statistics=RunStatistics.of(tasks, 12.5),
        submitted_at=T0,
        finished_at=T0 + timedelta(seconds=12.5),
        tasks=tasks,
    )


EVERY_STATUS = [
    task("ok", TaskStatus.SUCCEEDED, 0.25, attempts=1, output={"score": 0.9}, worker="w1"),
    task(
        "flaky",
        TaskStatus.FAILED,
        2.5,
        attempts=3,
        error_code=ErrorCode.RETRIES_EXHAUSTED,
        error_message="boom",
    ),
    task(
        "poor",
        TaskStatus.VALIDATION_FAILED,
        1.0,
        attempts=2,
        error_code=ErrorCode.CRITERIA_NOT_MET,
        error_message="output criteria not met: score >= 0.8: got 0.5",
    ),
    task(
        "slow", TaskStatus.TIMED_OUT, 1.0, error_code=ErrorCode.TIMEOUT, error_message="timed out after 1 s"
    ),
    task(
        "crash", TaskStatus.ERROR, 0.1, error_code=ErrorCode.EXECUTION_ERROR, error_message="RuntimeError: x"
    ),
    task(
        "after",
        TaskStatus.SKIPPED,
        None,
        attempts=0,
        error_code=ErrorCode.UPSTREAM_FAILED,
        error_message="upstream task 'flaky' ended failed",
    ),
    task(
        "later",
        TaskStatus.CANCELLED,
        None,
        attempts=0,
        error_code=ErrorCode.CANCELLED,
        error_message="cancelled",
    ),
    task("colours", TaskStatus.SUCCEEDED, 0.5, output={"stdout": "\x1b[31mred\x1b[0m \x00 <&> ünï"}),
]


def test_junit_is_valid_against_the_jenkins_schema(schema: xmlschema.XMLSchema) -> None:
    xml = report.to_junit([run_of("baseline", EVERY_STATUS), run_of("new-prompt", EVERY_STATUS[:2])])
    schema.validate(xml)  # raises with the offending path when it is not


def test_the_schema_is_not_trivially_satisfied(schema: xmlschema.XMLSchema) -> None:
    # What an earlier version wrote: a `skipped` count on <testsuites>, which the schema lacks.
    suite = '<testsuite name="s" tests="1" failures="0" errors="0"/>'
    bad = f'<testsuites tests="1" skipped="0">{suite}</testsuites>'
    assert not schema.is_valid(bad)
    assert not schema.is_valid('<testsuites><testsuite name="s"><testcase/></testsuite></testsuites>')
    assert not schema.is_valid('<testsuite name="s" tests="1" failures="0" errors="0" time="1.23456"/>')


def test_junit_has_a_suite_per_variant_and_a_case_per_task() -> None:
    root = ET.fromstring(report.to_junit([run_of("baseline", EVERY_STATUS), run_of("v2", EVERY_STATUS[:2])]))
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["eval/baseline", "eval/v2"]
    assert root.get("tests") == "10" and root.get("failures") == "4" and root.get("errors") == "1"
    s = suites[0]
    assert (s.get("tests"), s.get("failures"), s.get("errors"), s.get("skipped")) == ("8", "3", "1", "2")
    assert s.get("time") == "12.500" and s.get("timestamp") == "2026-01-01T12:00:00"
    props = {p.get("name"): p.get("value") for p in s.iter("property")}
    assert props == {"run_id": "run-baseline", "plan_id": "eval", "variant": "baseline", "status": "failed"}
    cases = {c.get("name"): c for c in s.findall("testcase")}
    assert list(cases) == [t.id for t in EVERY_STATUS]
    assert {c.get("classname") for c in cases.values()} == {"eval.baseline"}
    assert cases["flaky"].get("time") == "2.500" and cases["after"].get("time") == "0.000"

    failure = cases["flaky"].find("failure")
    assert failure is not None
    assert failure.get("type") == "E005" and failure.get("message") == "E005: boom"
    assert failure.text is not None and "attempts: 3" in failure.text
    poor = cases["poor"].find("failure")
    assert poor is not None and poor.get("type") == "E008" and "score >= 0.8" in (poor.get("message") or "")
    slow = cases["slow"].find("failure")
    assert slow is not None and slow.get("type") == "E002"
    error = cases["crash"].find("error")
    assert error is not None and error.get("message") == "E003: RuntimeError: x"
    skipped = cases["after"].find("skipped")
    assert skipped is not None and (skipped.get("message") or "").startswith("E009: upstream task")
    assert cases["later"].find("skipped") is not None
    assert cases["ok"].find("failure") is None and cases["ok"].find("skipped") is None
    out = cases["ok"].find("system-out")
    assert out is not None and json.loads(out.text or "") == {"score": 0.9}


def test_junit_escapes_what_xml_cannot_carry(schema: xmlschema.XMLSchema) -> None:
    # A shell command's last stderr line (in the message) may hold ANSI colours or NULs.
    coloured = task(
        "sh", TaskStatus.FAILED, error_code=ErrorCode.EXECUTION_ERROR, error_message="\x1b[31mred\x00 <&> ünï"
    )
    xml = report.to_junit([run_of("v", [coloured, EVERY_STATUS[-1]])])
    schema.validate(xml)
    failure = ET.fromstring(xml).find(".//failure")
    assert failure is not None
    assert failure.get("message") == "E003: \\x1b[31mred\\x00 <&> ünï"
    out = ET.fromstring(xml).findall(".//system-out")[-1]
    assert json.loads(out.text or "") == EVERY_STATUS[-1].output


def test_junit_of_a_run_in_progress(schema: xmlschema.XMLSchema) -> None:
    r = run_of(
        "v", [task("a", TaskStatus.RUNNING, 1.0), task("b", TaskStatus.PENDING, None)], RunStatus.RUNNING
    )
    xml = report.to_junit([r])
    schema.validate(xml)
    messages = [s.get("message") for s in ET.fromstring(xml).iter("skipped")]
    assert messages == ["still running", "still pending"]


class _Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows = 0
        self.bars: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.rows += tag == "tr"
        if tag == "div" and "left:" in (a.get("style") or ""):
            self.bars.append(a.get("style") or "")
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(a[key] or "")


def test_html_timeline_is_self_contained_with_a_bar_per_started_task() -> None:
    tasks = [
        TaskResult(id="a", status=TaskStatus.SUCCEEDED, started_at=T0, finished_at=T0 + timedelta(seconds=1)),
        TaskResult(
            id="<b>",
            status=TaskStatus.FAILED,
            started_at=T0 + timedelta(seconds=1),
            finished_at=T0 + timedelta(seconds=4),
            error_message="<script>alert(1)</script>",
        ),
        TaskResult(id="c", status=TaskStatus.SKIPPED),
    ]
    page = report.to_html([run_of("v", tasks)])
    parser = _Rows()
    parser.feed(page)
    assert parser.rows == 1 + len(tasks)  # a header, then a row per task
    assert parser.bars == [
        "left:0.00%;width:25.00%;background:#2e9d4f",
        "left:25.00%;width:75.00%;background:#d0363a",
    ]
    assert parser.external == []  # nothing to fetch: one file
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page


def test_table_lists_every_task_without_escape_codes_off_a_terminal() -> None:
    buf = io.StringIO()
    report.render_table(run_of("v", EVERY_STATUS), Console(file=buf, width=160))
    text = buf.getvalue()
    assert "\x1b[" not in text
    for t in EVERY_STATUS:
        assert t.id in text
    assert re.search(r"flaky\s+│\s+0\s+│\s+failed\s+│\s+3\s+│\s+E005", text)


def test_summary_line() -> None:
    line = report.summary_line(run_of("v", EVERY_STATUS))
    assert line == (
        "eval/v run-v: failed, 2/8 succeeded, 1 failed, 1 validation_failed, 1 timed_out, 1 error, "
        "1 skipped, 1 cancelled, 3 retries, 12.5 s"
    )


# ------------------------------------------------------------------ end to end


@pytest.fixture
def home() -> Iterator[Path]:
    """A short TASKEXEC_HOME (a Unix socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tx-", dir="/tmp"))
    try:
        yield path / "home"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.slow
def test_run_and_results_write_valid_junit_for_every_variant(home: Path, schema: xmlschema.XMLSchema) -> None:
    doc = {
        "id": "ci",
        "defaults": {"retry": {"max_attempts": 2, "backoff": 0.05, "jitter": False}},
        "variants": {"a": {}, "b": {"behavior": "failure"}},
        "tasks": [
            {"id": "maybe", "handler": "stub", "params": {"behavior": "success"}},
            {"id": "next", "handler": "stub", "depends_on": ["maybe"]},
            {
                "id": "scored",
                "handler": "stub",
                "params": {"output": {"score": 0.5}},
                "validate": [{"path": "score", "op": ">=", "value": 0.8}],
            },
        ],
    }
    plan = home.parent / "ci.yaml"
    plan.write_text(yaml.safe_dump(doc))
    junit = home.parent / "junit.xml"
    p = taskexec(home, "run", str(plan), "--json", "--junit", str(junit))
    assert p.returncode == 1, p.stderr
    runs = {r["variant"]: r for r in json.loads(p.stdout)}
    schema.validate(str(junit))
    root = ET.parse(junit).getroot()
    assert [s.get("name") for s in root.findall("testsuite")] == ["ci/a", "ci/b"]
    b = root.findall("testsuite")[1]
    assert (b.get("tests"), b.get("failures"), b.get("skipped")) == ("3", "2", "1")
    assert_nothing_left(home)

    # Later, from the SQLite file alone: the same results, each format.
    one = taskexec(home, "results", runs["b"]["run_id"], "--format", "junit")
    assert one.returncode == 1, one.stderr
    schema.validate(one.stdout)
    cases = {c.get("name"): c for c in ET.fromstring(one.stdout).iter("testcase")}
    failure = cases["maybe"].find("failure")
    assert failure is not None and failure.get("type") == "E005"
    assert (failure.get("message") or "").startswith("E005: stub: behavior failure")
    assert float(cases["maybe"].get("time") or 0) > 0
    as_json = taskexec(home, "results", runs["a"]["run_id"], "--format", "json")
    assert json.loads(as_json.stdout)["tasks"] == runs["a"]["tasks"]
    html = taskexec(home, "results", runs["a"]["run_id"], "--format", "html")
    assert html.returncode == 1 and html.stdout.startswith("<!doctype html>") and "scored" in html.stdout
    assert_nothing_left(home)
