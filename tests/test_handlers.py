"""Built-in handlers, the registry, output checks, criteria and secrets, as plain functions."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from taskexec.errors import (
    CriteriaError,
    HandlerNotAllowedError,
    ParamsError,
    RetryableError,
    TaskCancelled,
    TaskFailed,
)
from taskexec.models import PathCriterion, ValidatorCriterion
from taskexec.settings import Settings
from workers import secrets
from workers.handlers import HandlerContext, check_output, handler, resolve
from workers.validators import evaluate, validator

SETTINGS = Settings(allowed_handlers="shell,http,stub,python:tests,custom")


def ctx(attempt: int = 1, timeout: float = 30.0, **kw: Any) -> HandlerContext:
    return HandlerContext(run_id="r", task_id="t", attempt=attempt, timeout=timeout, **kw)


# ---------------------------------------------------------------- stub


def test_stub_returns_its_output_or_ids() -> None:
    stub = resolve("stub", SETTINGS)
    assert stub({"output": {"n": 1}, "model": "a"}, {}, ctx()) == {"n": 1}
    assert stub({}, {}, ctx(attempt=2)) == {"task_id": "t", "attempt": 2}


def test_stub_fails_the_first_attempts_then_behaves() -> None:
    stub = resolve("stub", SETTINGS)
    with pytest.raises(RetryableError, match="attempt 2 fails"):
        stub({"fail_attempts": 2}, {}, ctx(attempt=2))
    assert stub({"fail_attempts": 2, "output": {}}, {}, ctx(attempt=3)) == {}
    with pytest.raises(RetryableError, match="behavior failure"):
        stub({"fail_attempts": 1, "behavior": "failure"}, {}, ctx(attempt=2))
    with pytest.raises(RuntimeError):
        stub({"behavior": "error"}, {}, ctx())


def test_stub_failure_rate_is_reproducible_by_seed() -> None:
    stub = resolve("stub", SETTINGS)

    def outcomes(seed: int) -> list[bool]:
        out = []
        for attempt in range(1, 41):
            try:
                stub({"failure_rate": 0.5, "seed": seed}, {}, ctx(attempt=attempt))
                out.append(True)
            except RetryableError:
                out.append(False)
        return out

    assert outcomes(7) == outcomes(7)
    assert 5 < sum(outcomes(7)) < 35


def test_stub_bad_params_are_params_errors() -> None:
    with pytest.raises(ParamsError, match="delay"):
        resolve("stub", SETTINGS)({"delay": -1}, {}, ctx())
    assert ParamsError.code.value == "E001"


def test_stub_stops_waiting_when_the_run_is_cancelled() -> None:
    with pytest.raises(TaskCancelled):
        resolve("stub", SETTINGS)({"delay": 30}, {}, ctx(is_cancelled=lambda: True))


# ---------------------------------------------------------------- shell

PY = sys.executable


def test_shell_gets_inputs_on_stdin_and_params_in_the_environment() -> None:
    shell = resolve("shell", SETTINGS)
    code = (
        "import json, os, sys; d = json.load(sys.stdin); "
        "print(json.dumps([d, json.loads(os.environ['TASKEXEC_PARAMS']), os.environ['TASKEXEC_ATTEMPT'], "
        "os.environ['GREETING']]))"
    )
    out = shell(
        {"argv": [PY, "-c", code], "env": {"GREETING": "hi"}, "model": "m1", "parse_json": True},
        {"data": [1, 2]},
        ctx(attempt=2),
    )
    assert out["exit_code"] == 0 and out["stderr"] == ""
    assert out["json"] == [{"data": [1, 2]}, {"model": "m1"}, "2", "hi"]


def test_shell_never_passes_taskexec_settings_to_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKEXEC_DATABASE_URL", "postgresql://user:secret@db/x")
    code = "import os; print(sorted(k for k in os.environ if k.startswith('TASKEXEC_')))"
    out = resolve("shell", SETTINGS)({"argv": [PY, "-c", code]}, {}, ctx())
    assert "TASKEXEC_DATABASE_URL" not in out["stdout"] and "TASKEXEC_RUN_ID" in out["stdout"]


def test_shell_non_zero_exit_is_retryable_with_the_last_stderr_line() -> None:
    code = "import sys; print('warn', file=sys.stderr); print('boom', file=sys.stderr); sys.exit(3)"
    with pytest.raises(RetryableError, match="exited 3: boom"):
        resolve("shell", SETTINGS)({"argv": [PY, "-c", code]}, {}, ctx())


def test_shell_errors_are_clear() -> None:
    shell = resolve("shell", SETTINGS)
    with pytest.raises(ParamsError, match="cannot start"):
        shell({"argv": ["/no/such/program"]}, {}, ctx())
    with pytest.raises(ParamsError, match="argv"):
        shell({"argv": []}, {}, ctx())
    with pytest.raises(TaskFailed, match="not JSON"):
        shell({"argv": ["echo", "plain"], "parse_json": True}, {}, ctx())


def test_shell_own_timeout_kills_the_command() -> None:
    with pytest.raises(RetryableError, match="did not finish in 1 s"):
        resolve("shell", SETTINGS)({"argv": ["sleep", "30"], "timeout": 1}, {}, ctx())


# ---------------------------------------------------------------- http


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append(
            {"path": self.path, "method": self.command, "headers": dict(self.headers), "body": body}
        )
        status = int(self.path.strip("/").split("/")[0] or 200)
        payload = json.dumps({"ok": status < 400, "echo": body.decode() or None}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer  # noqa: N815 - http.server's names

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Recorder.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def test_http_posts_json_with_an_idempotency_key(server: str) -> None:
    out = resolve("http", SETTINGS)({"url": f"{server}/200", "json": {"q": 1}}, {}, ctx(attempt=3))
    assert out["status_code"] == 200 and out["json"]["echo"] == '{"q": 1}'
    [req] = _Recorder.seen
    assert req["method"] == "POST" and req["headers"]["Idempotency-Key"] == "r/t/3"


def test_http_5xx_and_429_retry_4xx_fails_refused_retries(server: str) -> None:
    http = resolve("http", SETTINGS)
    for status in (500, 503, 429):
        with pytest.raises(RetryableError, match=f"HTTP {status}"):
            http({"url": f"{server}/{status}"}, {}, ctx())
    with pytest.raises(TaskFailed, match="HTTP 404"):
        http({"url": f"{server}/404"}, {}, ctx())
    with pytest.raises(RetryableError):
        http({"url": "http://127.0.0.1:1/"}, {}, ctx())
    with pytest.raises(ParamsError, match="url"):
        http({"url": "file:///etc/passwd"}, {}, ctx())


# ---------------------------------------------------------------- registry


def test_handlers_must_be_allowed_and_found() -> None:
    with pytest.raises(HandlerNotAllowedError, match="not allowed"):
        resolve("python:os:system", SETTINGS)
    with pytest.raises(HandlerNotAllowedError, match="not registered"):
        resolve("custom", SETTINGS)

    @handler("custom")
    def custom(params: dict[str, Any], inputs: dict[str, Any], c: HandlerContext) -> dict[str, Any]:
        return {"custom": True}

    assert resolve("custom", SETTINGS) is custom
    echo = resolve("python:tests.handlers:echo", SETTINGS)
    assert echo({"a": 1}, {"x": 2}, ctx())["inputs"] == {"x": 2}
    with pytest.raises(HandlerNotAllowedError, match="cannot be imported"):
        resolve("python:tests.handlers:nope", SETTINGS)


def test_an_entry_point_handler_is_looked_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.handlers import registry

    def packaged(params: dict[str, Any], inputs: dict[str, Any], c: HandlerContext) -> dict[str, Any]:
        return {"packaged": True}

    class EntryPoint:
        def load(self) -> Any:
            return packaged

    scans: list[str] = []

    def entry_points(group: str, name: str) -> list[EntryPoint]:
        scans.append(name)
        return [EntryPoint()] if name == "packaged" else []

    monkeypatch.setattr(registry, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_from_packages", {})
    settings = Settings(allowed_handlers="packaged")
    assert resolve("packaged", settings) is packaged
    assert resolve("packaged", settings) is packaged
    assert scans == ["packaged"]


def test_outputs_must_be_json_objects_within_the_cap() -> None:
    assert check_output(None) == {}
    assert check_output({"a": (1, 2)}) == {"a": [1, 2]}
    with pytest.raises(TaskFailed, match="JSON object, not list"):
        check_output([1])
    with pytest.raises(TaskFailed, match="not JSON"):
        check_output({"x": float("nan")})
    with pytest.raises(TaskFailed, match="not JSON"):
        check_output({"x": object()})
    with pytest.raises(TaskFailed, match="TASKEXEC_MAX_OUTPUT_BYTES"):
        check_output({"x": "y" * 2000}, max_bytes=1024)


# ---------------------------------------------------------------- criteria


def crit(path: str, op: str, value: Any = None) -> PathCriterion:
    return PathCriterion.model_validate({"path": path, "op": op, "value": value})


@pytest.mark.parametrize(
    ("criterion", "passed"),
    [
        (crit("score", ">=", 0.8), True),
        (crit("score", ">", 0.9), False),
        (crit("score", "<", 1), True),
        (crit("score", "<=", 0.85), True),
        (crit("label", "==", "good"), True),
        (crit("label", "!=", "good"), False),
        (crit("label", "in", ["good", "fine"]), True),
        (crit("label", "not_in", ["good"]), False),
        (crit("label", "regex", "^go+d$"), True),
        (crit("items.1.name", "==", "b"), True),
        (crit("items.-1.name", "==", "b"), True),
        (crit("missing", "exists"), False),
        (crit("missing", "exists", False), True),
        (crit("items", "exists"), True),
        (crit("missing", ">", 1), False),
        (crit("items.5.name", "==", "x"), False),
    ],
)
def test_path_criteria(criterion: PathCriterion, passed: bool) -> None:
    output = {"score": 0.85, "label": "good", "items": [{"name": "a"}, {"name": "b"}]}
    [result] = evaluate([criterion], output)
    assert result.passed is passed, result.message


@pytest.mark.parametrize(
    ("criterion", "words"),
    [
        (crit("score", ">=", 0.8), "cannot compare"),
        (crit("score", "in", "high"), "must be a list"),
        (crit("score", "regex", "("), "regex"),
        (crit("flag", ">", 0), "cannot compare"),
    ],
)
def test_criteria_that_cannot_be_evaluated_are_e007(criterion: PathCriterion, words: str) -> None:
    with pytest.raises(CriteriaError, match=words) as info:
        evaluate([criterion], {"score": "high", "flag": True})
    assert info.value.code.value == "E007"


def test_registered_validators() -> None:
    @validator("short")
    def short(output: Any, params: dict[str, Any]) -> tuple[bool, str]:
        return len(output["text"]) <= params["max"], "length"

    results = evaluate(
        [ValidatorCriterion(validator="short", params={"max": 3}), ValidatorCriterion(validator="nonempty")],
        {"text": "long text"},
    )
    assert [r.passed for r in results] == [False, True]
    with pytest.raises(CriteriaError, match="no validator 'nope'"):
        evaluate([ValidatorCriterion(validator="nope")], {})


# ---------------------------------------------------------------- secrets


def test_secrets_resolve_from_the_environment_and_are_redacted() -> None:
    env = {"API_KEY": "sk-canary-1234", "OTHER": "tok-5678"}
    params = {"api_key": "API_KEY", "headers": {"auth": {"secret": "OTHER"}}, "plain": 1}
    resolved, found = secrets.resolve(params, ["api_key"], env)
    assert resolved == {"api_key": "sk-canary-1234", "headers": {"auth": "tok-5678"}, "plain": 1}
    leaked = {"echo": "key sk-canary-1234 and tok-5678", "list": ["sk-canary-1234"]}
    assert secrets.redact(leaked, found) == {"echo": "key *** and ***", "list": ["***"]}
    assert secrets.redact("error: sk-canary-1234 refused", found) == "error: *** refused"


def test_a_missing_secret_is_a_params_error() -> None:
    with pytest.raises(ParamsError, match=r"\$NOPE is not set"):
        secrets.resolve({"k": {"secret": "NOPE"}}, [], {})
    with pytest.raises(ParamsError, match="not an environment variable name"):
        secrets.resolve({"k": {"secret": "not a name"}}, [], {})
