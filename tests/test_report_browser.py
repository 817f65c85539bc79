"""The HTML timeline as a browser lays it out (issue 15, defect 9): long messages stay on one
line, every row keeps one height, and the full text is a hover or a click away.

Rendered by headless Chromium (``chromium --headless --dump-dom``): a script added to a copy
of the page measures the rows once laid out and writes the numbers into the DOM it dumps.
Skipped where no Chromium is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path

import pytest

from taskexec import report
from taskexec.models import ErrorCode, RunResult, RunStatistics, RunStatus, TaskResult, TaskStatus
from tests.conftest import _unavailable

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
LONG = (
    "output criteria not met: json.choices[0].message.content matches '^(yes|no)$': got "
    + "'The answer depends on several factors that the model went on to explain at length, " * 8
    + "' (E008 keeps the whole message)"
)

MEASURE = """
<script>
window.addEventListener('load', () => {
  const rows = [...document.querySelectorAll('table tr')].slice(1);
  const out = {
    rows: rows.map(r => r.getBoundingClientRect().height),
    bars: [...document.querySelectorAll('td.bar div')].map(d => d.getBoundingClientRect().height),
    msgs: [...document.querySelectorAll('td.msg')].map(td => ({
      height: td.getBoundingClientRect().height,
      title: (td.querySelector('[title]') || td).getAttribute('title'),
    })),
  };
  const d = document.querySelector('td.msg details');
  if (d) { d.open = true; out.expanded = d.textContent; }
  const pre = document.createElement('pre');
  pre.id = 'measured';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    _unavailable("Chromium (Debian: apt-get install chromium)", FileNotFoundError("chromium"))
    raise AssertionError("unreachable")


def failed_run() -> RunResult:
    tasks = [
        TaskResult(
            id="prepare",
            status=TaskStatus.SUCCEEDED,
            attempts=1,
            started_at=T0,
            finished_at=T0 + timedelta(seconds=1),
        ),
        *(
            TaskResult(
                id=f"judge[{i}]",
                stage=1,
                status=TaskStatus.VALIDATION_FAILED,
                attempts=2,
                error_code=ErrorCode.CRITERIA_NOT_MET,
                error_message=LONG,
                started_at=T0 + timedelta(seconds=1 + i),
                finished_at=T0 + timedelta(seconds=3 + i),
            )
            for i in range(3)
        ),
        TaskResult(id="report", stage=2, status=TaskStatus.SKIPPED, error_code=ErrorCode.UPSTREAM_FAILED),
    ]
    return RunResult(
        run_id="run-1",
        plan_id="eval",
        variant="default",
        status=RunStatus.FAILED,
        statistics=RunStatistics.of(tasks, 6.0),
        submitted_at=T0,
        finished_at=T0 + timedelta(seconds=6),
        tasks=tasks,
    )


def render(page: str, tmp_path: Path, *args: str) -> str:
    html = tmp_path / "timeline.html"
    html.write_text(page, encoding="utf-8")
    proc = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,800",
            "--virtual-time-budget=3000",
            *args,
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_long_messages_keep_every_row_one_line_high(tmp_path: Path) -> None:
    page = report.to_html([failed_run()])
    dom = render(page.replace("</body>", MEASURE + "</body>"), tmp_path, "--dump-dom")
    found = re.search(r"<pre id=\"measured\">(.*?)</pre>", dom, re.S)
    assert found, dom[-2000:]
    got = json.loads(unescape(found.group(1)))
    rows, bars = got["rows"], got["bars"]
    assert len(rows) == 5 and len(bars) == 4
    assert max(rows) < 40, rows  # one line of 13 px text, not a column of wrapped words
    assert max(rows) - min(rows) < 1, rows  # the same height with and without a message
    assert max(bars) - min(bars) < 1 and max(bars) < 30, bars
    # The full message is there: on hover (a title) and when expanded (a click).
    judged = [m for m in got["msgs"] if m["title"] and "E008" in m["title"]]
    assert len(judged) == 3 and all(LONG in m["title"] for m in judged)
    assert LONG in got["expanded"]


def test_screenshot_of_a_failed_run(tmp_path: Path) -> None:
    shot = tmp_path / "timeline.png"
    render(report.to_html([failed_run()]), tmp_path, f"--screenshot={shot}")
    assert shot.stat().st_size > 1000
