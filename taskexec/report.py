"""Run results as JSON, JUnit XML, an HTML timeline, a terminal table or one summary line.

JUnit follows the schema CI systems read (Jenkins xunit's ``junit-10.xsd``, which GitLab
and the GitHub test reporters also accept): one ``<testsuite>`` per run (a variant), one
``<testcase>`` per task, ``<failure>`` for a task that ended failed / validation_failed /
timed_out, ``<error>`` for ``error``, ``<skipped>`` for skipped and cancelled tasks, and
each task's execution time (its attempts' handler time, the pauses between them left out).
The HTML timeline is one self-contained page.

Times: a task's *execution* time sums its attempts; its *wall* time runs from its first
start to its end (retries and their backoff included), or to now while it runs or waits.

A matrix case is named by its values wherever a task is shown (:func:`task_label`): the
table and the HTML timeline after the task id, JUnit in the ``<testcase>`` name and as one
suite ``<property>`` per value (the Jenkins schema allows properties on suites only), and
the JSON as the task's ``case``.

Example:
    >>> print(summary_line(result))  # doctest: +SKIP
    quickstart/default 3f2a…: succeeded, 13/13 succeeded, 2 retries, 4.1 s
    >>> task_label(TaskResult(id="answer[0]", status="succeeded", case={"model": "gpt-4o", "lang": "en"}))
    'answer[0] model=gpt-4o lang=en'
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from taskexec.models import RunResult, RunStatus, TaskResult, TaskStatus

__all__ = [
    "STATUS_STYLE",
    "SUMMARY_WIDTH",
    "case_label",
    "render_table",
    "summary_line",
    "summary_lines",
    "task_label",
    "to_html",
    "to_json",
    "to_junit",
]

#: Colour of each status in terminal output.
STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "validation_failed": "red",
    "timed_out": "red",
    "error": "red",
    "running": "yellow",
    "validating": "yellow",
    "retrying": "magenta",
    "waiting_approval": "bold magenta",
    "queued": "cyan",
    "pending": "dim",
    "skipped": "dim",
    "cancelled": "dim",
}

_FAILURES = (TaskStatus.FAILED, TaskStatus.VALIDATION_FAILED, TaskStatus.TIMED_OUT)
#: Characters XML 1.0 cannot carry (a shell command's ANSI colours, say): shown escaped.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


#: Characters of one case value in a label, and of a label's values together (cut with …).
CASE_VALUE_CHARS = 24
CASE_LABEL_CHARS = 60
#: Characters of a case value in a JUnit property (the full value, within reason).
_PROPERTY_CHARS = 2_000
#: Columns the summary of a run fits in (:func:`summary_lines`).
SUMMARY_WIDTH = 80


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def _value_text(value: Any) -> str:
    """A case value, compact: a plain string as is, anything else (or a string with spaces,
    quotes or ``=``, or an empty one) as compact JSON."""
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"'=" for c in value):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def case_label(case: dict[str, Any] | None) -> str:
    """A matrix case's values as ``name=value`` words, short (``model=gpt-4o lang=en``).

    Each value is cut at :data:`CASE_VALUE_CHARS` and the whole at :data:`CASE_LABEL_CHARS`,
    with an ellipsis; ``""`` outside a matrix.

    >>> case_label({"model": "gpt-4o", "temperature": 0.2, "prompt": "say hi"})
    'model=gpt-4o temperature=0.2 prompt="say hi"'
    """
    if not case:
        return ""
    words = " ".join(f"{name}={_cut(_value_text(v), CASE_VALUE_CHARS)}" for name, v in case.items())
    return _cut(words, CASE_LABEL_CHARS)


def task_label(task: TaskResult) -> str:
    """A task's id, followed by its matrix case's values: ``answer[0] model=gpt-4o lang=en``."""
    label = case_label(task.case)
    return f"{task.id} {label}" if label else task.id


def to_json(results: RunResult | Sequence[RunResult]) -> str:
    """One run result as a JSON object, or several as a JSON list (the CLI contract's shape)."""
    if isinstance(results, RunResult):
        return results.model_dump_json(indent=2)
    return "[" + ",\n".join(r.model_dump_json(indent=2) for r in results) + "]"


def _seconds(task: TaskResult) -> float:
    if task.started_at and task.finished_at:
        return max(0.0, (task.finished_at - task.started_at).total_seconds())
    return 0.0


def _wall(task: TaskResult) -> float:
    """First start to end (or to now, as the store read it, while the task has not ended)."""
    return task.wall_seconds if task.wall_seconds is not None else _seconds(task)


def _execution(task: TaskResult) -> float:
    """The attempts' handler time; the wall time for results that do not carry it."""
    return task.execution_seconds if task.execution_seconds is not None else _wall(task)


def _junit_time(task: TaskResult) -> str:
    """Execution time in JUnit's milliseconds: a task that ran never reads ``0.000``."""
    seconds = _execution(task)
    shown = round(seconds, 3)
    return f"{0.001 if seconds > 0 and shown == 0 else shown:.3f}"


def _time_cells(task: TaskResult) -> tuple[str, str]:
    """``(execution, wall)`` as a table shows them: blank before the task started."""
    if not task.started_at:
        return "", ""
    return f"{_execution(task):.2f} s", f"{_wall(task):.2f} s"


def _xml_text(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _problem(t: TaskResult) -> tuple[str, str]:
    """A task's ``(message, details)``: ``E005: why`` and the lines a CI report shows under it."""
    message = _xml_text(": ".join(x for x in (t.error_code, t.error_message) if x) or t.status.value)
    details = [f"status: {t.status.value}", f"attempts: {t.attempts}"]
    if t.worker:
        details.append(f"worker: {t.worker}")
    details.append(message)
    return message, "\n".join(details)


def to_junit(results: Sequence[RunResult]) -> str:
    """JUnit XML as CI systems read it (the Jenkins xunit ``junit-10.xsd`` schema).

    A ``<testsuite>`` per run (so one per variant), a ``<testcase>`` per task with its
    execution time (its attempts' handler time, the pauses between them left out); ``<failure>`` for
    failed, validation_failed and timed_out, ``<error>`` for error, with the error code as
    ``type`` and ``code: message`` as ``message``; ``<skipped>`` for skipped, cancelled and
    not yet finished tasks; the task's output as ``<system-out>``.
    """
    root = ET.Element("testsuites", name="taskexec")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    total_time = 0.0
    for r in results:
        suite = ET.SubElement(root, "testsuite", name=f"{r.plan_id}/{r.variant}", id=r.run_id)
        props = ET.SubElement(suite, "properties")
        for name, value in (
            ("run_id", r.run_id),
            ("plan_id", r.plan_id),
            ("variant", r.variant),
            ("status", r.status.value),
            ("error_message", r.error_message),
        ):
            if value:
                ET.SubElement(props, "property", name=name, value=_xml_text(value))
        # The Jenkins schema has no properties on a testcase: a case's values are the suite's,
        # one property each, named after the task (`answer[0].model`).
        for t in r.tasks:
            for key, value in (t.case or {}).items():
                text = _cut(_value_text(value) if not isinstance(value, str) else value, _PROPERTY_CHARS)
                ET.SubElement(props, "property", name=_xml_text(f"{t.id}.{key}"), value=_xml_text(text))
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for t in r.tasks:
            classname = f"{r.plan_id}.{r.variant}"
            name = _xml_text(task_label(t))
            case = ET.SubElement(suite, "testcase", name=name, classname=classname, time=_junit_time(t))
            counts["tests"] += 1
            message, details = _problem(t)
            kind = {TaskStatus.ERROR: "error"}.get(t.status, "failure" if t.status in _FAILURES else "")
            if kind:
                counts["failures" if kind == "failure" else "errors"] += 1
                code = t.error_code.value if t.error_code else t.status.value
                ET.SubElement(case, kind, message=message, type=code).text = details
            elif t.status in (TaskStatus.SKIPPED, TaskStatus.CANCELLED):
                counts["skipped"] += 1
                ET.SubElement(case, "skipped", message=message)
            elif t.status is not TaskStatus.SUCCEEDED:  # the run has not ended yet
                counts["skipped"] += 1
                ET.SubElement(case, "skipped", message=f"still {t.status.value}")
            if t.output is not None:
                out = json.dumps(t.output, default=str, ensure_ascii=False)[:100_000]
                ET.SubElement(case, "system-out").text = _xml_text(out)
        duration = r.statistics.duration_seconds or 0.0
        total_time += duration
        suite.set("time", f"{duration:.3f}")
        suite.set("timestamp", r.submitted_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        for k, v in counts.items():
            suite.set(k, str(v))
            if k in totals:
                totals[k] += v
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


_HTML_COLOUR = {
    "succeeded": "#2e9d4f",
    "failed": "#d0363a",
    "validation_failed": "#e0703a",
    "timed_out": "#b02a7a",
    "error": "#8b1d1d",
    "cancelled": "#9a9a9a",
    "skipped": "#c8c8c8",
}
_HTML_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h2{font-size:1.1em;margin:1.5em 0 .3em}
table{border-collapse:collapse;width:100%}
td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap;font-size:13px;
  line-height:18px;vertical-align:top}
tr.task{height:23px}
td.bar{width:55%;min-width:12em;position:relative;padding:0}
td.bar div{position:absolute;top:4px;height:15px;min-width:2px;border-radius:2px}
td.msg{color:#666;max-width:32em;overflow:hidden}
td.msg details{max-width:32em}
td.msg summary{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;cursor:pointer;
  list-style:none}
td.msg summary::-webkit-details-marker{display:none}
td.msg details[open] summary{color:#222}
td.msg details div{white-space:pre-wrap;word-break:break-word;padding:2px 0 4px;max-width:32em}
.case{color:#666;margin-left:.5em}
.legend span{display:inline-block;margin-right:1em}
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-1px}
"""


def to_html(results: Sequence[RunResult]) -> str:
    """A self-contained HTML timeline: per run, a row per task with a bar from start to finish."""
    from html import escape

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>taskexec timeline</title>",
        f"<style>{_HTML_STYLE}</style></head><body>",
        "<p class='legend'>"
        + "".join(f"<span><i style='background:{c}'></i>{escape(n)}</span>" for n, c in _HTML_COLOUR.items())
        + "</p>",
    ]
    for r in results:
        started = [t for t in r.tasks if t.started_at]
        t0 = min((t.started_at for t in started if t.started_at), default=r.submitted_at)
        end = max((t.started_at + timedelta(seconds=_wall(t)) for t in started if t.started_at), default=t0)
        span = max(1e-3, (end - t0).total_seconds())
        parts.append(f"<h2>{escape(summary_line(r))}</h2>")
        parts.append(
            "<table><tr><th>task</th><th>stage</th><th>status</th><th>attempts</th>"
            "<th title='execution time: the attempts, pauses between them left out'>time</th>"
            "<th title='wall time: first start to end, retries included'>wall</th>"
            f"<th>0 s … {span:.2f} s</th><th>message</th></tr>"
        )
        for t in r.tasks:
            bar = ""
            if t.started_at:
                left = (t.started_at - t0).total_seconds() / span * 100
                width = _wall(t) / span * 100
                colour = _HTML_COLOUR.get(t.status.value, "#e0b03a")
                tip = (
                    f"{task_label(t)}: {t.status.value}, {_execution(t):.3f} s executing, "
                    f"{_wall(t):.3f} s wall, attempt {t.attempts}"
                )
                bar = (
                    f"<div style='left:{left:.2f}%;width:{width:.2f}%;background:{colour}' "
                    f"title='{escape(tip, quote=True)}'></div>"
                )
            execution, wall = _time_cells(t)
            parts.append(
                f"<tr class='task'><td>{escape(t.id)}{_html_case(t)}</td><td>{t.stage}</td>"
                f"<td>{escape(t.status.value)}</td><td>{t.attempts}</td><td>{execution}</td><td>{wall}</td>"
                f"<td class='bar'>{bar}</td>"
                f"<td class='msg'>{_html_message(t)}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_case(t: TaskResult) -> str:
    """A matrix case's label after the task id; its full values on hover."""
    from html import escape

    label = case_label(t.case)
    if not label:
        return ""
    full = json.dumps(t.case, ensure_ascii=False, default=str)[:20_000]
    return f"<span class='case' title='{escape(full, quote=True)}'>{escape(label)}</span>"


def _html_message(t: TaskResult) -> str:
    """A task's message on one line (cut with an ellipsis); the full text on hover and on a click."""
    from html import escape

    message = ": ".join(x for x in (t.error_code, t.error_message) if x)
    if not message:
        return ""
    full = escape(message[:20_000], quote=True)
    return f"<details><summary title='{full}'>{escape(message[:300])}</summary><div>{full}</div></details>"


def _summary_parts(result: RunResult) -> list[str]:
    """The summary's parts after ``plan/variant run: status``: counts, retries, duration."""
    s = result.statistics
    parts = [f"{s.succeeded}/{s.total} succeeded"]
    for name in ("failed", "validation_failed", "timed_out", "error", "skipped", "cancelled"):
        n = getattr(s, name)
        if n:
            parts.append(f"{n} {name}")
    if s.retries:
        parts.append(f"{s.retries} retries")
    if s.duration_seconds is not None:
        parts.append(f"{s.duration_seconds:.1f} s")
    return parts


def summary_line(result: RunResult) -> str:
    """``plan/variant run: status, n/total succeeded, retries, duration``."""
    parts = _summary_parts(result)
    return f"{result.plan_id}/{result.variant} {result.run_id}: {result.status.value}, " + ", ".join(parts)


def summary_lines(result: RunResult, width: int = SUMMARY_WIDTH) -> list[str]:
    """:func:`summary_line` in lines of at most ``width`` columns, for a terminal.

    The same words: the first line starts ``plan/variant run: status`` (the run id whole;
    the plan and variant cut with … when they would not leave it room) and takes as many of
    the counts as fit; the others follow on indented lines, each line broken after a comma.
    One line, :func:`summary_line` itself, when it fits.
    """
    status = f": {result.status.value}"
    room = width - len(result.run_id) - len(status) - 2  # a space before the run id, a comma after
    where = _cut(f"{result.plan_id}/{result.variant}", max(1, room))
    tokens = [f"{where} {result.run_id}{status}", *_summary_parts(result)]
    lines: list[str] = []
    current = ""
    for i, token in enumerate(tokens):
        piece = token + ("," if i < len(tokens) - 1 else "")
        if not current:
            current = piece
        elif len(current) + 1 + len(piece) <= width:
            current += " " + piece
        else:
            lines.append(current)
            current = "  " + piece
    lines.append(current)
    return lines


def render_table(result: RunResult, console: Console, *, limit: int = 200) -> None:
    """A table of a run's tasks (failures first when there are more than ``limit``)."""
    table = Table(expand=False)
    # time: execution time (the attempts, pauses between them left out); wall: first start
    # to end, retries included, or to now while the task runs or waits.
    tasks = result.tasks
    if len(tasks) > limit:
        tasks = sorted(tasks, key=lambda t: t.status is TaskStatus.SUCCEEDED)[:limit]
    for col in ("task", "stage", "status", "attempts", "code", "time", "wall", "message"):
        table.add_column(
            col, overflow="fold", justify="right" if col in ("stage", "attempts", "time", "wall") else "left"
        )
    for t in tasks:
        style = STATUS_STYLE.get(t.status.value, "")
        label = case_label(t.case)
        table.add_row(
            Text.assemble(t.id, (f" {label}", "dim")) if label else t.id,
            str(t.stage),
            f"[{style}]{t.status.value}[/]" if style else t.status.value,
            str(t.attempts),
            t.error_code or "",
            *_time_cells(t),
            (t.error_message or "")[:200],
        )
    if result.status is RunStatus.SUCCEEDED:
        style = "bold green"
    else:
        style = "bold red" if result.status.terminal else "bold"
    # The summary above the table, not as its title: a title wraps at the table's width.
    for line in summary_lines(result, min(SUMMARY_WIDTH, console.width)):
        console.print(line, style=style, highlight=False, soft_wrap=True)
    if result.params:
        shown = " ".join(
            f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in result.params.items()
        )
        console.print(Text.assemble(("params: ", "bold"), shown), highlight=False, soft_wrap=True)
    console.print(table)
    if len(result.tasks) > limit:
        console.print(f"… {len(result.tasks) - limit} more tasks (use --format json for all)")
