"""Built-in handlers, the registry, output checks, criteria and secrets, as plain functions."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest

from taskexec.errors import (
    CriteriaError,
    DestinationNotAllowedError,
    HandlerNotAllowedError,
    ParamsError,
    RetryableError,
    TaskCancelled,
    TaskFailed,
)
from taskexec.handlers import HandlerContext, check_output, handler, validator, worker_settings
from taskexec.models import PathCriterion, ValidatorCriterion
from taskexec.settings import Settings
from workers import netguard, secrets
from workers.handlers import resolve
from workers.handlers.shell import INHERITED
from workers.validators import evaluate

SETTINGS = Settings(allowed_handlers="shell,http,stub,python:tests,custom")
#: The test servers listen on loopback: only an operator's TASKEXEC_HTTP_ALLOW lets a request reach them.
LOOPBACK = SETTINGS.model_copy(update={"http_allow": ["127.0.0.1"]})


def ctx(attempt: int = 1, timeout: float = 30.0, **kw: Any) -> HandlerContext:
    kw.setdefault("settings", SETTINGS)
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
    # parse_json: the JSON on stdout is the output (a non-object value under "value").
    assert out == {"value": [{"data": [1, 2]}, {"model": "m1"}, "2", "hi"]}


def test_shell_parse_json_object_is_the_output_itself() -> None:
    code = "import json; print(json.dumps({'rows': 3, 'items': [1, 2]}))"
    out = resolve("shell", SETTINGS)({"argv": [PY, "-c", code], "parse_json": True}, {}, ctx())
    assert out == {"rows": 3, "items": [1, 2]}


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


def test_shell_commands_get_a_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTHER_TEAM_API_KEY", "sk-other-team")
    monkeypatch.setenv("TASKEXEC_WEBHOOK_SECRET", "whsec")
    monkeypatch.setenv("LANG", "C.UTF-8")
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    out = resolve("shell", SETTINGS)({"argv": [PY, "-c", code], "env": {"MINE": "1"}}, {}, ctx())
    seen = json.loads(out["stdout"])
    task = {
        "TASKEXEC_RUN_ID",
        "TASKEXEC_TASK_ID",
        "TASKEXEC_ATTEMPT",
        "TASKEXEC_IDEMPOTENCY_KEY",
        "TASKEXEC_PARAMS",
    }
    # Python itself may add LC_CTYPE when it coerces the C locale: an inherited name anyway.
    assert set(seen) <= {*INHERITED, *task, "MINE"}
    assert task | {"PATH", "MINE"} <= set(seen)
    assert seen["PATH"] == os.environ["PATH"] and seen["LANG"] == "C.UTF-8"
    assert "sk-other-team" not in out["stdout"] and "whsec" not in out["stdout"]


def test_the_embedded_fleet_marker_is_one_a_command_inherits() -> None:
    from taskexec.embedded.processes import MARKER as _MARKER

    assert _MARKER in INHERITED  # the embedded fleet's stop finds orphaned commands by it


#: A shell script that reports who runs it and whether it can read its parent's environment.
WHO = (
    'id -u; id -G; echo "$HOME"; pwd; '
    "if cat /proc/$PPID/environ > /dev/null 2>&1; then echo readable; else echo refused; fi"
)


def test_shell_without_a_shell_user_can_read_the_worker_environment() -> None:
    """Why TASKEXEC_SHELL_USER exists: a clean environment alone hides nothing from /proc."""
    out = resolve("shell", SETTINGS)({"argv": ["sh", "-c", WHO]}, {}, ctx())
    assert out["stdout"].split()[-1] == "readable"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CAP_SETUID)")
def test_shell_user_runs_the_command_as_that_user_who_cannot_read_the_worker() -> None:
    as_nobody = SETTINGS.model_copy(update={"shell_user": "nobody"})
    out = resolve("shell", SETTINGS)({"argv": ["sh", "-c", WHO]}, {}, ctx(settings=as_nobody))
    uid, groups, home, cwd, proc = out["stdout"].split()
    import pwd

    nobody = pwd.getpwnam("nobody")
    assert (int(uid), int(groups)) == (nobody.pw_uid, nobody.pw_gid)  # no supplementary groups
    assert home == nobody.pw_dir and Path(cwd) == Path(tempfile_dir())
    assert proc == "refused"
    by_uid = SETTINGS.model_copy(update={"shell_user": str(nobody.pw_uid)})
    out = resolve("shell", SETTINGS)({"argv": ["id", "-u"]}, {}, ctx(settings=by_uid))
    assert out["stdout"].strip() == str(nobody.pw_uid)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def test_an_unknown_shell_user_fails_the_task() -> None:
    ghost = SETTINGS.model_copy(update={"shell_user": "no-such-user-x"})
    with pytest.raises(TaskFailed, match="'no-such-user-x' is not a user on this worker"):
        resolve("shell", SETTINGS)({"argv": ["true"]}, {}, ctx(settings=ghost))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop the capability")
def test_a_worker_that_cannot_switch_users_fails_the_task_and_says_why() -> None:
    """Without CAP_SETUID the command does not start at all: never as the worker's own user."""
    code = (
        "from taskexec.settings import Settings; from taskexec.handlers import HandlerContext\n"
        "from workers.handlers import resolve\n"
        "s = Settings(shell_user='nobody')\n"
        "try:\n"
        "    resolve('shell', s)({'argv': ['id', '-u']}, {}, HandlerContext('r', 't', settings=s))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-setuid,-setgid", PY, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout.startswith("TaskFailed E003: this worker cannot run commands as 'nobody'"), proc
    assert "CAP_SETUID" in proc.stdout


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
    out = resolve("http", SETTINGS)(
        {"url": f"{server}/200", "json": {"q": 1}}, {}, ctx(attempt=3, settings=LOOPBACK)
    )
    assert out["status_code"] == 200 and out["json"]["echo"] == '{"q": 1}'
    [req] = _Recorder.seen
    assert req["method"] == "POST" and req["headers"]["Idempotency-Key"] == "r/t/3"


def test_http_5xx_and_429_retry_4xx_fails_refused_retries(server: str) -> None:
    http = resolve("http", SETTINGS)
    for status in (500, 503, 429):
        with pytest.raises(RetryableError, match=f"HTTP {status}"):
            http({"url": f"{server}/{status}"}, {}, ctx(settings=LOOPBACK))
    with pytest.raises(TaskFailed, match="HTTP 404"):
        http({"url": f"{server}/404"}, {}, ctx(settings=LOOPBACK))
    with pytest.raises(RetryableError):
        http({"url": "http://127.0.0.1:1/"}, {}, ctx(settings=LOOPBACK))
    with pytest.raises(ParamsError, match="url"):
        http({"url": "file:///etc/passwd"}, {}, ctx())


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("{server}/200", "127.0.0.1, a loopback address"),
        ("http://localhost:{port}/200", "localhost at 127.0.0.1, a loopback address"),
        ("http://169.254.169.254/latest/meta-data/iam/", "169.254.169.254, a cloud metadata address"),
        ("http://[fd00:ec2::254]/latest/", "fd00:ec2::254, a cloud metadata address"),
        ("http://100.100.100.200/latest/", "100.100.100.200, a cloud metadata address"),
        ("http://[::ffff:127.0.0.1]:{port}/200", "a loopback address (as 127.0.0.1)"),
        ("http://10.0.0.1/", "10.0.0.1, a private address"),
        ("http://0.0.0.0:{port}/200", "0.0.0.0, an unspecified address"),
        ("http://2130706433:{port}/200", "127.0.0.1, a loopback address"),
    ],
)
def test_http_refuses_internal_addresses_unless_allowed(server: str, url: str, words: str) -> None:
    port = server.rsplit(":", 1)[1]
    with pytest.raises(DestinationNotAllowedError) as info:
        resolve("http", SETTINGS)({"url": url.format(server=server, port=port)}, {}, ctx())
    assert info.value.code.value == "E001" and words in info.value.message
    assert "TASKEXEC_HTTP_ALLOW" in info.value.message
    assert _Recorder.seen == [], "nothing was sent"


def test_http_allowed_destinations_by_address_range_and_name(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    http = resolve("http", SETTINGS)
    for allow in (["127.0.0.0/8"], ["localhost"], ["*.localhost", "localhost"]):
        settings = SETTINGS.model_copy(update={"http_allow": allow})
        out = http({"url": f"http://localhost:{port}/200"}, {}, ctx(settings=settings))
        assert out["status_code"] == 200
    assert len(_Recorder.seen) == 3


@pytest.fixture
def second_server() -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.2 that redirects every request to the URL in its path's query."""
    seen: list[str] = []

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(302)
            self.send_header("Location", self.path.split("?to=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.2", 0), Redirect)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def test_a_redirect_to_an_address_not_allowed_is_refused(
    server: str, second_server: tuple[str, list[str]]
) -> None:
    allowed, seen = second_server
    only_it = SETTINGS.model_copy(update={"http_allow": ["127.0.0.2"]})
    with pytest.raises(DestinationNotAllowedError, match=r"127\.0\.0\.1, a loopback address"):
        resolve("http", SETTINGS)({"url": f"{allowed}/go?to={server}/200"}, {}, ctx(settings=only_it))
    assert len(seen) == 1 and _Recorder.seen == [], "the allowed server answered; the other got nothing"
    both = SETTINGS.model_copy(update={"http_allow": ["127.0.0.1", "127.0.0.2"]})
    out = resolve("http", SETTINGS)({"url": f"{allowed}/go?to={server}/200"}, {}, ctx(settings=both))
    assert out["status_code"] == 200 and len(_Recorder.seen) == 1


def test_the_connection_uses_the_address_that_was_checked(
    server: str, second_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name is resolved once, and the socket connects to a checked address.

    ``rebind.example`` answers a loopback address first, then an allowed one: the loopback
    one is skipped, never connected to; a name resolving to loopback alone is refused.
    """
    allowed, seen = second_server
    port = int(allowed.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    answers = {
        "rebind.example": ["127.0.0.1", "127.0.0.2"],
        "inside.example": ["127.0.0.1"],
    }

    def fake(host: str, *args: Any, **kw: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, args[0])) for ip in answers[host]]
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    only_2 = netguard.Allowance.parse(["127.0.0.2"])
    sock = netguard.connect("rebind.example", port, only_2, timeout=5)
    assert sock.getpeername() == ("127.0.0.2", port)
    sock.close()
    with pytest.raises(DestinationNotAllowedError, match=r"inside\.example at 127\.0\.0\.1"):
        netguard.connect("inside.example", port, only_2, timeout=5)
    assert seen == [] and _Recorder.seen == []


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", True), ("::1", True), ("169.254.169.254", True), ("fe80::1", True),
        ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.0.1", True), ("fc00::1", True),
        ("100.64.0.1", True), ("0.0.0.0", True), ("::", True), ("224.0.0.1", True), ("ff02::1", True),
        ("240.0.0.1", True), ("::ffff:169.254.169.254", True), ("64:ff9b::a00:1", True),
        ("2002:7f00:1::", True), ("fd00:ec2::254", True), ("100.100.100.200", True),
        ("8.8.8.8", False), ("2606:4700:4700::1111", False), ("::ffff:8.8.8.8", False),
    ],
)  # fmt: skip
def test_which_addresses_are_refused(address: str, refused: bool) -> None:
    assert (netguard.refusal(ipaddress.ip_address(address)) is not None) is refused


def test_https_verifies_the_hostname_of_the_url_not_of_the_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket goes to the checked address; TLS still checks the certificate for the URL's host."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted by the opener's default context
    _Recorder.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    port = srv.server_address[1]
    try:
        # A fresh allowance: openers are cached by allowance, and this one must trust the test CA.
        by_name = SETTINGS.model_copy(
            update={"http_allow": ["localhost", "127.0.0.1/32", "tls-test.invalid"]}
        )
        out = resolve("http", SETTINGS)({"url": f"https://localhost:{port}/200"}, {}, ctx(settings=by_name))
        assert out["status_code"] == 200
        with pytest.raises(RetryableError, match="certificate verify failed"):
            resolve("http", SETTINGS)({"url": f"https://127.0.0.1:{port}/200"}, {}, ctx(settings=by_name))
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def test_http_allow_entries_are_validated() -> None:
    assert Settings(http_allow="127.0.0.1/32, internal.example.com,*.svc.local,::1").http_allow == [
        "127.0.0.1/32",
        "internal.example.com",
        "*.svc.local",
        "::1",
    ]
    with pytest.raises(ValueError, match="neither an address"):
        Settings(http_allow="http://x/")


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
    from workers.handlers import loading as registry

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
    resolved, found = secrets.resolve(params, ["api_key"], env, allowed=["API_KEY", "OTHER"])
    assert resolved == {"api_key": "sk-canary-1234", "headers": {"auth": "tok-5678"}, "plain": 1}
    leaked = {"echo": "key sk-canary-1234 and tok-5678", "list": ["sk-canary-1234"]}
    assert secrets.redact(leaked, found) == {"echo": "key *** and ***", "list": ["***"]}
    assert secrets.redact("error: sk-canary-1234 refused", found) == "error: *** refused"


def test_a_missing_secret_is_a_params_error() -> None:
    with pytest.raises(ParamsError, match=r"\$NOPE is not set"):
        secrets.resolve({"k": {"secret": "NOPE"}}, [], {}, allowed=["NOPE"])
    with pytest.raises(ParamsError, match="not an environment variable name"):
        secrets.resolve({"k": {"secret": "not a name"}}, [], {}, allowed=["*"])


class _Watched(dict[str, str]):
    """An environment that records which variables were read."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.append(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.append(key)
        return super().__getitem__(key)


WORKER_ENV = {
    "OPENAI_API_KEY": "sk-openai-1",
    "OPENAI_ORG": "org-2",
    "OTHER_TEAM_KEY": "sk-other-3",
    "TASKEXEC_DATABASE_URL": "postgresql://postgres:pw@db/x",
    "TASKEXEC_WEBHOOK_SECRET": "whsec-4",
}


@pytest.mark.parametrize(
    ("params", "secret_params", "path", "words"),
    [
        ({"h": {"X-Key": {"secret": "OTHER_TEAM_KEY"}}}, [], "params.h.X-Key", "$OTHER_TEAM_KEY is not"),
        ({"key": "OTHER_TEAM_KEY"}, ["key"], "params.key", "$OTHER_TEAM_KEY is not allowed"),
        ({"u": [{"secret": "TASKEXEC_DATABASE_URL"}]}, [], "params.u[0]", "$TASKEXEC_DATABASE_URL is a"),
        ({}, ["taskexec_webhook_secret"], "params.taskexec_webhook_secret", "$TASKEXEC_WEBHOOK_SECRET is"),
    ],
)  # fmt: skip
def test_a_secret_the_operator_does_not_allow_fails_e001_unread(
    params: dict[str, Any], secret_params: list[str], path: str, words: str
) -> None:
    env = _Watched(WORKER_ENV)
    # TASKEXEC_* are refused even when the operator lists them, by name or by prefix.
    allowed = ["OPENAI_*", "TASKEXEC_*", "TASKEXEC_DATABASE_URL", "TASKEXEC_WEBHOOK_SECRET"]
    with pytest.raises(ParamsError) as info:
        secrets.resolve(params, secret_params, env, allowed=allowed)
    assert str(info.value).startswith(f"E001: {path}: ") and words in info.value.message
    assert env.read == [], "the value was never read"


def test_allowed_secrets_by_name_and_prefix() -> None:
    params = {
        "a": {"secret": "OPENAI_API_KEY"},
        "b": {"secret": "OPENAI_ORG"},
        "c": {"secret": "OTHER_TEAM_KEY"},
    }
    resolved, _ = secrets.resolve(params, [], WORKER_ENV, allowed=["OPENAI_*", "OTHER_TEAM_KEY"])
    assert resolved == {"a": "sk-openai-1", "b": "org-2", "c": "sk-other-3"}
    with pytest.raises(ParamsError, match="OPENAI_ORG is not allowed"):
        secrets.resolve(params, [], WORKER_ENV, allowed=["OPENAI_API_KEY", "OTHER_TEAM_KEY"])
    with pytest.raises(ParamsError, match="not allowed"):
        secrets.resolve(params, [], WORKER_ENV, allowed=[])  # the default: none


def test_the_allowed_secrets_default_to_the_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskexec.celery_app import app

    monkeypatch.setitem(app.conf, "taskexec_settings", Settings(secrets="OPENAI_API_KEY"))
    assert worker_settings().secrets == ["OPENAI_API_KEY"]
    assert HandlerContext("r", "t").settings is worker_settings()
    resolved, _ = secrets.resolve({"k": {"secret": "OPENAI_API_KEY"}}, [], WORKER_ENV)
    assert resolved == {"k": "sk-openai-1"}
    with pytest.raises(ParamsError, match="not allowed"):
        secrets.resolve({"k": {"secret": "OPENAI_ORG"}}, [], WORKER_ENV)


def test_secret_settings_are_validated() -> None:
    assert Settings(secrets="OPENAI_*, SCORER_API_KEY").secrets == ["OPENAI_*", "SCORER_API_KEY"]
    assert Settings().secrets == []
    for bad in ("*", "A*B", "not a name"):
        with pytest.raises(ValueError, match="not a variable name"):
            Settings(secrets=bad)


CANARY = 'c@n/ary "7f3a" +x&y=z\\9é'


def _encodings(secret: str) -> dict[str, str]:
    data = secret.encode()
    return {
        "plain": secret,
        "reversed": secret[::-1],
        "base64": base64.b64encode(data).decode(),
        "base64, unpadded": base64.b64encode(data).decode().rstrip("="),
        "base64url": base64.urlsafe_b64encode(data).decode(),
        "base64 at offset 1": base64.b64encode(b"x" + data + b"tail").decode(),
        "base64 at offset 2": base64.b64encode(b"xy" + data + b"t").decode(),
        "base64 at offset 3": base64.b64encode(b"xyz" + data).decode(),
        "base64url at offset 1": base64.urlsafe_b64encode(b"?" + data + b">>").decode(),
        "url": quote(secret, safe=""),
        "url, path": quote(secret),
        "url, form": quote_plus(secret),
        "url, lower-case escapes": re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quote(secret, safe="")),
        "json": json.dumps(secret),
        "json, utf-8": json.dumps(secret, ensure_ascii=False),
        "json in json": json.dumps(json.dumps(secret)),
        "hex": data.hex(),
        "HEX": data.hex().upper(),
    }


@pytest.mark.parametrize("encoding", list(_encodings(CANARY)))
def test_every_usual_encoding_of_a_secret_is_redacted(encoding: str) -> None:
    encoded = _encodings(CANARY)[encoding]
    text = f"before {encoded} after"
    out = secrets.redact({"stdout": text, encoded: [text]}, [CANARY])
    dumped = json.dumps(out, ensure_ascii=False)
    for form in _encodings(CANARY).values():
        assert form not in dumped and form[1:-1] not in dumped, (encoding, form, dumped)
    assert "before" in out["stdout"] and "after" in out["stdout"] and "***" in out["stdout"]


def test_short_secrets_are_not_redacted_and_other_text_stays() -> None:
    assert secrets.redact("abc abc", ["abc"]) == "abc abc"
    assert secrets.variants("abc") == set()
    assert secrets.redact("nothing to hide here", [CANARY]) == "nothing to hide here"


def test_redacting_a_mebibyte_with_three_secrets_is_fast() -> None:
    found = sorted([CANARY, "sk-" + "k" * 45, "canary-7f3a9c51e2"], key=len, reverse=True)
    rng = __import__("random").Random(7)
    chunk = base64.b64encode(rng.randbytes(3 * 1024)).decode() + "\n"
    text = (
        (chunk * (1024 * 1024 // len(chunk)))[: 1024 * 1024 - 200]
        + " "
        + base64.b64encode(CANARY.encode()).decode()
    )
    secrets.redact("warm up", found)  # the masker is built once per set of secrets
    started = time.perf_counter()
    out = secrets.redact({"stdout": text}, found)
    spent = time.perf_counter() - started
    assert out["stdout"].endswith(" ***")
    print(f"redacting 1 MiB with 3 secrets: {spent * 1000:.1f} ms")
    assert spent < 0.5


# ---------------------------------------------------------------- http: header names, httpx


class _LowerCaseType(BaseHTTPRequestHandler):
    """Answers JSON as Python's http.server code often does: ``Content-type`` (lower-case t)."""

    def do_GET(self) -> None:
        payload = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


def test_http_reads_json_whatever_the_case_of_the_header_name() -> None:
    """Issue 15, defect 4: ``Content-type: application/json`` is JSON (header names are case-insensitive)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _LowerCaseType)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/"
        out = resolve("http", SETTINGS)({"url": url}, {}, ctx(settings=LOOPBACK))
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()
    assert out["status_code"] == 200 and out["json"] == {"ok": True} and "text" not in out


@pytest.fixture
def mock_http(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[httpx.Request]]:
    """The http handler's client replaced by one on ``httpx.MockTransport``: the requests it got.

    Each request's answer is the one its path names: ``/json`` (``content-type`` in lower
    case, ``+json``), ``/text``, ``/timeout`` (a read timeout), ``/NNN`` (that status).
    """
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path == "/json":
            return httpx.Response(
                200,
                headers=[("content-type", "application/problem+json"), ("X-Trace", "a"), ("x-trace", "b")],
                content=b'{"title": "fine"}',
            )
        if path == "/timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if path == "/text":
            return httpx.Response(200, headers={"Content-Type": "text/plain"}, content=b"hello")
        return httpx.Response(int(path.strip("/")), content=b"why")

    mock = httpx.Client(transport=httpx.MockTransport(answer))
    monkeypatch.setattr(netguard, "client", lambda allowance, redirects=True: mock)
    try:
        yield seen
    finally:
        mock.close()


def test_http_over_a_mock_transport_headers_json_and_timeouts(mock_http: list[httpx.Request]) -> None:
    http = resolve("http", SETTINGS)
    out = http(
        {"url": "http://api.example/json", "headers": {"idempotency-key": "mine"}, "timeout": 7},
        {},
        ctx(attempt=2, timeout=30),
    )
    assert out["json"] == {"title": "fine"} and "text" not in out
    assert out["headers"]["content-type"] == "application/problem+json"
    assert out["headers"]["X-Trace"] == "a, b", "a repeated header keeps the server's first name"
    [req] = mock_http
    # The plan's header replaces the default whatever the case of its name: one key, not two.
    assert req.headers.get_list("Idempotency-Key") == ["mine"] and req.headers["user-agent"] == "taskexec"
    assert req.extensions["timeout"] == {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}
    http({"url": "http://api.example/text", "timeout": 90}, {}, ctx(timeout=30))
    assert mock_http[-1].extensions["timeout"]["read"] == 30.0, "at most the task's timeout"
    assert mock_http[-1].headers["Idempotency-Key"] == "r/t/1"
    assert http({"url": "http://api.example/text"}, {}, ctx()) == {
        "status_code": 200,
        "headers": {"Content-Type": "text/plain", "Content-Length": "5"},
        "text": "hello",
    }
    with pytest.raises(RetryableError, match="ReadTimeout"):
        http({"url": "http://api.example/timeout"}, {}, ctx())
    with pytest.raises(RetryableError, match="HTTP 502 why"):
        http({"url": "http://api.example/502"}, {}, ctx())
    with pytest.raises(TaskFailed, match="HTTP 403 why"):
        http({"url": "http://api.example/403"}, {}, ctx())


def test_http_uses_one_pooled_client_per_process_and_allowance() -> None:
    allowance = netguard.Allowance.parse(["127.0.0.1"])
    first = netguard.client(allowance)
    try:
        assert netguard.client(netguard.Allowance.parse(["127.0.0.1"])) is first
        assert netguard.client(allowance, redirects=False) is not first
        assert first.trust_env is False, "no proxies from the environment: they would bypass the guard"
    finally:
        netguard.close_clients()
    assert first.is_closed


def test_the_http_handler_connects_to_the_checked_address_through_httpx(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding through the pooled client: the name is resolved once by the guard, and
    httpx connects to the address it checked, never to the name again."""
    port = int(server.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    asked: list[str] = []
    answers = {"inside.example": ["127.0.0.1"], "rebind.example": ["10.9.9.9", "127.0.0.1"]}

    def fake(host: str, *args: Any, **kw: Any) -> Any:
        asked.append(host)
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, args[0])) for ip in answers[host]]
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    http = resolve("http", SETTINGS)
    with pytest.raises(DestinationNotAllowedError, match=r"inside\.example at 127\.0\.0\.1, a loopback"):
        http({"url": f"http://inside.example:{port}/200"}, {}, ctx())
    assert _Recorder.seen == []
    # Only 127.0.0.1 is allowed (by address): 10.9.9.9 is skipped, 127.0.0.1 reached.
    out = http({"url": f"http://rebind.example:{port}/200"}, {}, ctx(settings=LOOPBACK))
    assert out["status_code"] == 200 and len(_Recorder.seen) == 1
    assert _Recorder.seen[0]["headers"]["Host"] == f"rebind.example:{port}"
    assert asked.count("rebind.example") == 1, "resolved once, by the guard"
