"""Attempt logs (issue 16, item 5): captured, bounded, masked, stored per attempt, followed live.

The fast tier checks the pieces as plain functions and one worker's attempt on SQLite (the
stand-in harness); the integration tier runs plans on a real fleet (and an embedded run)
and reads them back with ``taskexec logs``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from taskexec import Client, parse_plan
from taskexec.errors import RetryableError, RunNotFoundError
from taskexec.handlers import HandlerContext
from taskexec.logs import TextView
from taskexec.models import AttemptLog, TaskStatus
from taskexec.services import Services
from taskexec.settings import Settings
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.store.tables import utcnow
from tests import standin
from tests.conftest import ROOT, Fleet, wait_for
from workers.attempt import _Redacting
from workers.capture import LogCapture
from workers.handlers import resolve

SECRET = "tok-3f9a-Zq81!"
#: The forms of SECRET a command may print, as redact covers them.
FORMS = {
    "plain": SECRET,
    "reversed": SECRET[::-1],
    "base64": base64.b64encode(SECRET.encode()).decode(),
    "hex": SECRET.encode().hex(),
    "url": quote(SECRET, safe=""),
    "json": json.dumps(SECRET)[1:-1],
}


def stored(streams: list[Any]) -> dict[str, tuple[str, bool]]:
    return {name: (text, cut) for name, text, cut, _ in streams}


# ---------------------------------------------------------------- bounds


def test_an_attempt_keeps_at_most_its_limit_shared_out_and_marks_the_cut() -> None:
    capture = LogCapture("r", "t", 1, limit=4096, redis=None)
    for i in range(1000):  # 10,890 bytes of stdout
        capture.emit("stdout", f"line {i:04d}\n")
    capture.emit("stderr", "warning: one\n")
    capture.emit("error", "ValueError: boom\n")
    logs = stored(capture.close())
    # The short streams are whole: a flood of stdout does not crowd them out.
    assert logs["stderr"] == ("warning: one\n", False)
    assert logs["error"] == ("ValueError: boom\n", False)
    text, cut = logs["stdout"]
    assert cut
    kept, marker = text.rsplit("\n", 1)
    assert kept.startswith("line 0000\nline 0001\n")
    assert all(len(line) == 9 for line in kept.splitlines())  # cut after a whole line
    assert marker.startswith("… [truncated: ") and marker.endswith(" more]")
    assert "KiB more" in marker
    total = len(kept.encode()) + len("warning: one\n") + len("ValueError: boom\n")
    assert total <= 4096
    assert total > 4096 - 20  # the share is used, not wasted


def test_memory_stays_bounded_while_bytes_are_counted() -> None:
    capture = LogCapture("r", "t", 1, limit=1024, redis=None)
    for _ in range(2000):
        capture.emit("stdout", "x" * 1000)
    [(name, text, cut, _)] = capture.close()
    assert name == "stdout" and cut
    assert "[truncated: 1.9 MiB more]" in text
    assert len(text.encode()) < 1100


def test_a_stream_within_the_limit_is_whole_and_not_marked() -> None:
    capture = LogCapture("r", "t", 1, limit=1024, redis=None)
    capture.emit("stdout", "a\n")
    capture.emit("stdout", "b")
    assert stored(capture.close()) == {"stdout": ("a\nb", False)}


def test_nul_bytes_do_not_reach_the_store() -> None:
    capture = LogCapture("r", "t", 1, limit=1024, redis=None)
    capture.emit("stdout", "a\x00b\n")
    assert stored(capture.close())["stdout"][0] == "a\ufffdb\n"


# ---------------------------------------------------------------- secrets


def test_secrets_are_masked_in_every_form_in_stored_streams() -> None:
    capture = LogCapture("r", "t", 1, limit=64 * 1024, redis=None)
    capture.secrets = [SECRET]
    for name, form in FORMS.items():
        capture.emit("stdout", f"{name}: {form}\n")
    capture.emit("stderr", f"half {SECRET[:6]}")  # a secret split across two writes
    capture.emit("stderr", f"{SECRET[6:]} end\n")
    logs = stored(capture.close())
    for text, _ in logs.values():
        for name, form in FORMS.items():
            assert form not in text, name
    assert logs["stdout"][0].count("***") == len(FORMS)
    assert logs["stderr"][0] == "half *** end\n"


def test_a_secret_cut_by_the_limit_leaves_no_part_of_itself() -> None:
    capture = LogCapture("r", "t", 1, limit=1024, redis=None)
    capture.secrets = [SECRET]
    capture.emit("stdout", "x" * (1024 + 4 * len(base64.b64encode(SECRET.encode())) * 4 - 7) + SECRET)
    capture.emit("stdout", SECRET * 10)
    [(_, text, cut, _)] = capture.close()
    assert cut
    for form in FORMS.values():
        for n in range(4, len(form)):
            assert form[:n] not in text.replace("x", "")


class _RecordingRedis:
    """What ``publish`` sends, recorded (the pipeline calls of redis-py, nothing more)."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.lists: dict[str, list[str]] = {}

    def pipeline(self, transaction: bool = True) -> _RecordingRedis:
        return self

    def rpush(self, key: str, value: str) -> None:
        self.lists.setdefault(key, []).append(value)

    def expire(self, key: str, seconds: int) -> None:
        pass

    def publish(self, channel: str, data: str) -> None:
        self.published.append(json.loads(data))

    def execute(self) -> None:
        pass


def test_live_chunks_are_masked_even_when_a_secret_comes_in_two_writes() -> None:
    fake = _RecordingRedis()
    capture = LogCapture("r", "t", 1, limit=64 * 1024, redis=fake)  # type: ignore[arg-type]
    capture.secrets = [SECRET]
    capture.emit("stdout", f"first {SECRET}\n")
    capture.emit("stdout", f"then {SECRET[:5]}")
    wait_for(lambda: fake.published, timeout=10, what="the first chunk")
    capture.emit("stdout", f"{SECRET[5:]} and {FORMS['base64']}\n")
    capture.close()
    texts = [c["text"] for c in fake.published]
    assert "".join(texts) == "first ***\nthen *** and ***\n"
    for text in texts:
        for n in range(4, len(SECRET) + 1):
            assert SECRET[:n] not in text and SECRET[-n:] not in text
    assert [c["seq"] for c in fake.published] == list(range(len(texts)))
    assert all(len(v) == len(texts) for v in fake.lists.values())  # each chunk in the backlog too


def test_live_output_stops_at_the_limit_with_a_notice() -> None:
    fake = _RecordingRedis()
    capture = LogCapture("r", "t", 1, limit=1024, redis=fake)  # type: ignore[arg-type]
    for _ in range(50):
        capture.emit("stdout", "y" * 99 + "\n")
    capture.close()
    text = "".join(c["text"] for c in fake.published)
    assert len(text.replace("\n", "").rstrip()) < 1024 + 200
    assert fake.published[-1]["truncated"] and "live output stops at 1.0 KiB" in text


# ---------------------------------------------------------------- ctx.logger


def test_the_handler_logger_keeps_info_while_the_worker_shows_only_its_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    capture = LogCapture("r", "t", 1, limit=4096, redis=None)
    masked = _Redacting()
    masked.secrets = capture.secrets = [SECRET]
    logging.getLogger("taskexec.task.logtest").setLevel(logging.WARNING)
    try:
        logger = masked.logger("taskexec.task.logtest", capture.handler())
        with caplog.at_level(logging.WARNING, logger="taskexec.task.logtest"):
            logger.info("calling with %s", SECRET)
            logger.debug("not kept")
            logger.warning("slow answer")
    finally:
        logging.getLogger("taskexec.task.logtest").setLevel(logging.NOTSET)
    text = stored(capture.close())["log"][0]
    assert "INFO calling with ***" in text and "WARNING slow answer" in text
    assert "not kept" not in text and SECRET not in text
    assert [r.getMessage() for r in caplog.records] == ["slow answer"]  # the worker's level still applies


# ---------------------------------------------------------------- handlers


def test_the_shell_handler_hands_on_each_line_while_the_command_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    seen: list[tuple[str, str]] = []

    def emit(stream: str, text: str) -> None:
        seen.append((stream, text))
        if "early" in text:
            gate.touch()  # the command goes on only once its first line has arrived here

    script = (
        "import os, sys, time\n"
        "print('early', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        "print('late')\n"
    )
    ctx = HandlerContext(run_id="r", task_id="t", timeout=30, emit=emit, settings=Settings())
    out = resolve("shell", Settings())({"argv": [sys.executable, "-c", script]}, {"x": 1}, ctx)
    assert out["stdout"] == "early\nlate\n" and out["stderr"] == "to stderr\n"
    assert [t for s, t in seen if s == "stdout"] == ["early\n", "late\n"]
    assert ("stderr", "to stderr\n") in seen


def test_the_shell_handler_still_feeds_stdin_and_keeps_whole_streams() -> None:
    big = {"rows": list(range(50_000))}  # more than a pipe holds: written while read
    script = "import sys, json; d = json.load(sys.stdin); print(len(d['rows'])); print('e' * 70000)"
    ctx = HandlerContext(run_id="r", task_id="t", timeout=30, settings=Settings())
    out = resolve("shell", Settings())({"argv": [sys.executable, "-c", script]}, big, ctx)
    assert out["stdout"].splitlines() == ["50000", "e" * 70000]


class _Failing(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'{"error": "database is down", "detail": "' + b"d" * 5000 + b'"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def failing_server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def test_the_http_handler_logs_the_status_line_and_the_body_of_a_failure(failing_server: str) -> None:
    seen: list[tuple[str, str]] = []
    settings = Settings(http_allow="127.0.0.1")
    ctx = HandlerContext(
        run_id="r", task_id="t", timeout=30, emit=lambda s, t: seen.append((s, t)), settings=settings
    )
    with pytest.raises(RetryableError, match="HTTP 500"):
        resolve("http", settings)({"url": f"{failing_server}/x"}, {}, ctx)
    [(stream, text)] = seen
    assert stream == "http"
    assert text.startswith(f"GET {failing_server}/x\nHTTP/1.1 500 Internal Server Error\n\n")
    assert '{"error": "database is down"' in text and text.endswith("… [body cut for the log]\n")


# ---------------------------------------------------------------- one attempt, stored


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[standin.Harness]:
    with standin.harness(tmp_path, monkeypatch, ["shell", "python:tests"]) as h:
        settings = h.svc.settings.model_copy(update={"secrets": ["LOGS_TEST_TOKEN"]})
        h.rt.services = Services(settings, h.app, h.svc.store, None)
        monkeypatch.setenv("LOGS_TEST_TOKEN", SECRET)
        yield h


def test_an_attempt_stores_what_its_handler_logged_and_raised_masked(harness: standin.Harness) -> None:
    run_id = harness.started(
        """
        tasks:
          - id: py
            handler: python:tests.log_handlers:noisy_failure
            retry: {max_attempts: 2, backoff: 0, jitter: false}
            params: {token: {secret: LOGS_TEST_TOKEN}}
        """
    )
    harness.execute(run_id, "py")
    with harness.svc.store.begin() as s:
        first = repo.attempt_logs(s, run_id, "py", 1)
    by_stream = {e.stream: e for e in first}
    assert set(by_stream) == {"log", "error"}
    assert "INFO starting with token ***" in by_stream["log"].text
    error = by_stream["error"].text
    assert error.startswith("Traceback (most recent call last):")
    assert "in _explode" in error and "ValueError: cannot use token ***" in error
    assert SECRET not in error and not by_stream["error"].truncated
    assert by_stream["log"].at <= by_stream["error"].at


def test_a_step_that_times_out_keeps_what_it_printed_until_then(harness: standin.Harness) -> None:
    script = "import time; print('before the wait', flush=True); time.sleep(30)"
    run_id = harness.started(
        f"""
        tasks:
          - id: stuck
            handler: shell
            retry: {{max_attempts: 1}}
            params: {{argv: [{sys.executable}, -c, "{script}"], timeout: 1}}
        """
    )
    harness.execute(run_id, "stuck")
    assert harness.statuses(run_id) == {"stuck": TaskStatus.TIMED_OUT}
    with harness.svc.store.begin() as s:
        logs = {e.stream: e.text for e in repo.attempt_logs(s, run_id, "stuck")}
    assert logs == {
        "stdout": "before the wait\n",
        "error": f"HandlerTimedOut: {sys.executable} did not finish in 1 s\n",
    }


def test_the_store_query_filters_and_a_rewrite_replaces(store: Store) -> None:
    plan = parse_plan({"tasks": [{"id": "a", "handler": "stub"}, {"id": "b", "handler": "stub"}]})
    from taskexec.plan.compiler import compile_plan

    [manifest] = compile_plan(plan, Settings())
    run_id = "3f9a2b1c4d5e4f60a7b8c9d0e1f2a3b4"
    t0 = utcnow()
    with store.begin() as s:
        repo.add_run(s, run_id, manifest)
        repo.add_attempt_logs(s, run_id, "a", 1, [("stdout", "one\n", False, t0)])
        repo.add_attempt_logs(s, run_id, "b", 1, [("error", "boom\n", False, t0)])
        repo.add_attempt_logs(s, run_id, "a", 2, [("stdout", "two?\n", False, t0)])
    with store.begin() as s:  # the same attempt written again (a retried commit): replaced, not doubled
        repo.add_attempt_logs(
            s,
            run_id,
            "a",
            2,
            [("stdout", "two\n", False, t0), ("stderr", "late\n", True, t0 + timedelta(seconds=1))],
        )
    with Client(Settings(database_url=store.url), store=store) as client:
        everything = client.logs(run_id[:8])
        assert [(e.task_id, e.attempt, e.stream, e.text) for e in everything] == [
            ("a", 1, "stdout", "one\n"),
            ("b", 1, "error", "boom\n"),
            ("a", 2, "stdout", "two\n"),
            ("a", 2, "stderr", "late\n"),
        ]
        assert [e.text for e in client.logs(run_id, "a")] == ["one\n", "two\n", "late\n"]
        [only] = client.logs(run_id, "a", attempt=1)
        assert only == AttemptLog(
            run_id=run_id, task_id="a", attempt=1, stream="stdout", text="one\n", truncated=False, at=t0
        )
        assert client.logs(run_id, "b", attempt=2) == []
        with pytest.raises(RunNotFoundError, match="no task 'nope'") as info:
            client.logs(run_id, "nope")
        assert str(info.value).startswith("E001 TASK:")
        with pytest.raises(RunNotFoundError, match="E001"):
            client.logs("ffffffffff")
        with store.begin() as s:
            assert repo.logged_attempts(s, run_id) == [("a", 1), ("b", 1), ("a", 2)]


def test_the_text_view_heads_each_stream_and_ends_lines() -> None:
    at = utcnow()
    view = TextView()
    entries = [
        AttemptLog(run_id="r", task_id="a", attempt=1, stream="stdout", text="par", at=at),
        AttemptLog(run_id="r", task_id="a", attempt=1, stream="stdout", text="tial\n", at=at),
        AttemptLog(run_id="r", task_id="a", attempt=1, stream="stderr", text="no newline", at=at),
        AttemptLog(run_id="r", task_id="a", attempt=2, stream="stdout", text="x\n", at=at),
    ]
    out = "".join(view.text(e) for e in entries) + view.end()
    lines = out.splitlines()
    assert [line.split(" · ")[:3] for line in lines if line.startswith("==> ")] == [
        ["==> a", "attempt 1", "stdout"],
        ["==> a", "attempt 1", "stderr"],
        ["==> a", "attempt 2", "stdout"],
    ]
    assert "partial" in lines and "no newline" in lines and out.endswith("x\n")


# ---------------------------------------------------------------- on a fleet


def taskexec(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskexec.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def log_fleet(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    """One executor (2 processes) that may reach loopback and read the test secret."""
    env = {**fleet_env, "TASKEXEC_HTTP_ALLOW": "127.0.0.1", "CANARY_SECRET": SECRET}
    f = Fleet(env, tmp_path)
    try:
        f.start("executor", 2, "logs")
        yield f
    finally:
        f.stop()


SHELL_BOTH = (
    "import os, sys, base64\n"
    "print('hello from stdout')\n"
    "print('careful on stderr', file=sys.stderr)\n"
    "print('token', os.environ['TOKEN'], base64.b64encode(os.environ['TOKEN'].encode()).decode())\n"
)
SECOND_TIME_LUCKY = (
    "import os, sys\n"
    "n = os.environ['TASKEXEC_ATTEMPT']\n"
    "print('attempt ' + n + ' speaking')\n"
    "sys.exit(1 if n == '1' else 0)\n"
)


@pytest.mark.integration
def test_logs_of_shell_python_and_http_steps_on_a_fleet(
    log_fleet: Fleet, failing_server: str, tmp_path: Path
) -> None:
    plan = {
        "id": "logs",
        "defaults": {"retry": {"max_attempts": 1}},
        "tasks": [
            {
                "id": "shell",
                "handler": "shell",
                "params": {
                    "argv": [sys.executable, "-c", SHELL_BOTH],
                    "env": {"TOKEN": {"secret": "CANARY_SECRET"}},
                },
            },
            {"id": "py", "handler": "python:tests.log_handlers:noisy_failure", "params": {"token": "t-1"}},
            {"id": "web", "handler": "http", "params": {"url": f"{failing_server}/status"}},
            {
                "id": "lucky",
                "handler": "shell",
                "retry": {"max_attempts": 2, "backoff": 0, "jitter": False},
                "params": {"argv": [sys.executable, "-c", SECOND_TIME_LUCKY]},
            },
        ],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    env = log_fleet.env
    submitted = taskexec("submit", str(path), env=env)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.split()[0]
    settings = log_fleet.settings()
    assert isinstance(settings, Settings)
    with Client(settings) as client:
        result = client.wait(run_id, timeout=90)
        statuses = {t.id: t.status for t in result.tasks}
        assert statuses == {
            "shell": TaskStatus.SUCCEEDED,
            "py": TaskStatus.ERROR,
            "web": TaskStatus.FAILED,
            "lucky": TaskStatus.SUCCEEDED,
        }

    shell = taskexec("logs", run_id[:8], "shell", env=env)
    assert shell.returncode == 0, shell.stderr
    assert "hello from stdout" in shell.stdout and "careful on stderr" in shell.stdout
    assert "token *** ***" in shell.stdout and SECRET not in shell.stdout
    assert "· stdout ·" in shell.stdout and "· stderr ·" in shell.stdout

    py = taskexec("logs", run_id, "py", env=env).stdout
    assert "INFO starting with token t-1" in py
    assert "Traceback (most recent call last):" in py and "ValueError: cannot use token t-1" in py

    web = taskexec("logs", run_id, "web", "--json", env=env)
    records = [AttemptLog.model_validate_json(line) for line in web.stdout.splitlines()]
    streams = {r.stream: r.text for r in records}
    assert streams["http"].startswith(f"GET {failing_server}/status\nHTTP/1.1 500 Internal Server Error")
    assert "database is down" in streams["http"]
    assert "HTTP 500" in streams["error"]

    second = taskexec("logs", run_id, "lucky", "--attempt", "2", env=env).stdout
    assert "attempt 2 speaking" in second and "attempt 1 speaking" not in second
    both = taskexec("logs", run_id, "lucky", env=env).stdout
    assert both.index("attempt 1 speaking") < both.index("attempt 2 speaking")

    unknown = taskexec("logs", run_id, "nope", env=env)
    assert unknown.returncode == 2 and "E001" in unknown.stderr and "nope" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    too_far = taskexec("logs", run_id, "lucky", "--attempt", "3", env=env)
    assert too_far.returncode == 2 and "E001 --attempt" in too_far.stderr


class _Following:
    """A ``taskexec logs --follow`` process, its stdout read line by line as it comes."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskexec.cli", "logs", *args, "--follow"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def ended(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        return code

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return err


@pytest.mark.integration
def test_follow_prints_a_line_while_the_task_runs_and_ends_with_it(log_fleet: Fleet, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = (
        "import os, time\n"
        "print('early line', flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
        "print('late line', flush=True)\n"
    )
    plan = {
        "tasks": [
            {
                "id": "slow",
                "handler": "shell",
                "timeout": 60,
                "params": {"argv": [sys.executable, "-c", script]},
            }
        ]
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    env = log_fleet.env
    run_id = taskexec("submit", str(path), env=env).stdout.split()[0]
    settings = log_fleet.settings()
    assert isinstance(settings, Settings)
    early = _Following(env, run_id, "slow")  # from before the task starts
    late: _Following | None = None
    try:
        wait_for(lambda: early.saw("early line"), timeout=60, what="the early line")
        with Client(settings) as client:
            # The task cannot end before the gate exists: the line came while it ran.
            assert client.status(run_id).tasks[0].status is TaskStatus.RUNNING
            assert early.proc.poll() is None
            # Who joins now, the whole run, as JSON, gets the line printed before it came.
            late = _Following(env, run_id[:10], "--json")
            wait_for(lambda: late is not None and late.saw("early line"), timeout=60, what="the backlog")
            assert client.status(run_id).tasks[0].status is TaskStatus.RUNNING
            gate.touch()
            client.wait(run_id, timeout=60)
        assert early.ended(60) == 0
        assert late.ended(60) == 0
    finally:
        errors = early.close() + (late.close() if late is not None else "")
    assert "Traceback" not in errors, errors
    text = "".join(early.lines)
    # Each line once: printed live, not again from the store when the task ended.
    assert text.count("early line") == 1 and text.count("late line") == 1
    assert text.index("early line") < text.index("late line")
    records = [AttemptLog.model_validate_json(line) for line in late.lines]
    assert "".join(r.text for r in records) == "early line\nlate line\n"
    assert {(r.task_id, r.attempt, r.stream) for r in records} == {("slow", 1, "stdout")}


@pytest.mark.integration
def test_logs_after_an_embedded_run(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "tasks:\n"
        "  - id: hello\n"
        "    handler: shell\n"
        f"    params: {{argv: [{sys.executable}, -c, \"print('embedded hello')\"]}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    env.update({"TASKEXEC_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)})
    ran = taskexec("run", str(plan), env=env, timeout=180)
    assert ran.returncode == 0, ran.stderr
    shown = taskexec("logs", "--last", "hello", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "embedded hello" in shown.stdout and "· stdout ·" in shown.stdout
    followed = taskexec("logs", "--last", "--follow", env=env, timeout=60)  # ended: prints, returns
    assert followed.returncode == 0 and "embedded hello" in followed.stdout
