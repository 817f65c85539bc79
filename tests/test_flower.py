"""``taskexec flower``: Flower on the test Redis with live workers, read through its API.

The live test starts real worker processes (the ``fleet`` fixture) and ``taskexec flower``
on a free loopback port with basic auth, runs a plan, and reads ``/api/workers`` and
``/api/tasks``: our tasks are there, with their states, and their arguments are ids,
never params; a task waiting for a rate-limit token shows as a retry with its reason. The
other tests check the command's refusal to serve without auth and the task formatting,
without starting Flower.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from taskexec import Client, RunStatus, parse_plan
from taskexec.cli import main
from taskexec.cli.ops import flower_argv, flower_task_format, is_loopback
from taskexec.models import RateLimit
from taskexec.run.ratelimit import RateLimiter, bucket_key
from taskexec.settings import Settings
from tests.conftest import ROOT, Fleet, wait_for

pytestmark = pytest.mark.integration

USER, PASSWORD = "tester", "s3cret-" + uuid.uuid4().hex[:6]
#: A value only the plan's params hold: Flower must never show it.
MARKER = "param-marker-" + uuid.uuid4().hex[:8]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, *, auth: bool = True) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except OSError:
        return 0, b""


def get_json(url: str) -> Any:
    status, body = get(url)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


@contextlib.contextmanager
def flower(env: dict[str, str], port: int, state: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``taskexec flower`` as a process of its own session, stopped (killed if need be) at exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskexec.cli",
                "flower",
                "--port",
                str(port),
                "--address",
                "127.0.0.1",
                "--state-file",
                str(state),
            ],
            env={**env, "TASKEXEC_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


PLAN = {
    "id": "flower-check",
    "tasks": [
        {"id": "prepare", "handler": "stub", "params": {"output": {"note": MARKER}}},
        {
            "id": "score",
            "handler": "stub",
            "depends_on": ["prepare"],
            "params": {"output": {"score": 0.9, "note": MARKER}},
            "validate": [{"path": "score", "op": ">=", "value": 0.8}],
        },
        {
            "id": "flaky",
            "handler": "stub",
            "depends_on": ["prepare"],
            "params": {"fail_attempts": 1, "output": {"ok": True}},
            "retry": {"max_attempts": 3, "backoff": 0.05, "multiplier": 1.0, "jitter": False},
        },
    ],
}


#: A global limit of one token a second, unique to this test run (the test Redis is shared).
LIMIT_NAME = "flower-" + uuid.uuid4().hex[:8]
LIMIT = RateLimit(per_minute=60, burst=1, scope="global")
THROTTLED = {
    "id": "flower-throttled",
    "rate_limits": {LIMIT_NAME: LIMIT.model_dump()},
    "tasks": [{"id": "limited", "handler": "stub", "rate_limit": LIMIT_NAME}],
}


@contextlib.contextmanager
def another_consumer(broker: str) -> Iterator[None]:
    """Another user of the global limit (another fleet on the same API key) that asks for its
    next token every 20 ms: whenever a task of ours arrives, the next token is promised to
    it, so the task is refused once and waits for its own turn in a throttled retry."""
    client = redis.Redis.from_url(broker)
    limiter = RateLimiter(client)
    key = bucket_key(LIMIT_NAME, LIMIT, run_id="-")
    stop = threading.Event()

    def ask() -> None:
        while not stop.wait(0.02):
            limiter.acquire(key, LIMIT, holder="other-fleet")

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    try:
        yield
    finally:
        stop.set()
        asking.join(timeout=5)
        client.close()


def shown_args(task: dict[str, Any]) -> str:
    """The args Flower's pages show for a task of its API."""
    return str(flower_task_format(SimpleNamespace(name=task["name"], args=task["args"])).args)


def test_flower_shows_the_fleet_and_our_tasks(fleet: Fleet, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = tmp_path / "flower.db"
    log = tmp_path / "flower.log"
    with flower(fleet.env, port, state, log) as proc:

        def up() -> bool:
            assert proc.poll() is None, f"flower exited {proc.returncode}:\n{log.read_text()}"
            return get(f"{base}/healthcheck", auth=False) == (200, b"OK")

        wait_for(up, timeout=30, what="Flower's /healthcheck")
        assert get(f"{base}/api/workers", auth=False)[0] == 401, "the API needs the credentials"
        assert get(f"{base}/tasks", auth=False)[0] == 401
        # Flower's own Prometheus metrics stay open to the scraper.
        status, body = get(f"{base}/metrics", auth=False)
        assert status == 200 and b"flower_" in body

        def roles() -> dict[str, str]:
            """executor/validator -> the node consuming that queue (and control), per Flower."""
            found: dict[str, str] = {}
            for node, info in get_json(f"{base}/api/workers?refresh=1").items():
                consumed = {q["name"] for q in info.get("active_queues") or []}
                found.update(
                    {role: node for role in ("executor", "validator") if consumed == {role, "control"}}
                )
            return found

        wait_for(lambda: len(roles()) == len(fleet.procs) == 2, timeout=30, what="the fleet in /api/workers")
        nodes = roles()

        def workers_alive() -> bool:
            # ?status=1 answers from Flower's event state: true once heartbeats arrive.
            alive = get_json(f"{base}/api/workers?status=1")
            return all(alive.get(node) for node in nodes.values())

        wait_for(workers_alive, timeout=30, what="worker heartbeats in Flower")

        settings = fleet.settings()
        assert isinstance(settings, Settings)
        with Client(settings) as client, another_consumer(settings.broker_url):
            result = client.submit(parse_plan(PLAN)).wait(timeout=60)
            limited = client.submit(parse_plan(THROTTLED)).wait(timeout=60)
        assert result.status is RunStatus.SUCCEEDED, result
        assert limited.status is RunStatus.SUCCEEDED and limited.statistics.throttled >= 1, limited
        run_id = result.run_id

        def ours() -> list[dict[str, Any]]:
            tasks = get_json(f"{base}/api/tasks?limit=1000")
            return [t for t in tasks.values() if run_id in (t.get("args") or "") + (t.get("uuid") or "")]

        def settled() -> bool:
            found = ours()
            executes = [t for t in found if t["name"] == "taskexec.execute" and t["state"] == "SUCCESS"]
            advances = [t for t in found if t["name"] == "taskexec.advance" and t["state"] == "SUCCESS"]
            validates = [t for t in found if t["name"] == "taskexec.validate" and t["state"] == "SUCCESS"]
            return len(executes) == 3 and len(advances) == 2 and len(validates) == 1

        wait_for(settled, timeout=30, what="our tasks in Flower")
        found = ours()
        by_name: dict[str, list[dict[str, Any]]] = {}
        for t in found:
            by_name.setdefault(t["name"], []).append(t)
        # The API shows args as taskexec's argsrepr (ids and the stage; a retry keeps them),
        # rewritten by format_task to lead with what tells tasks apart.
        stage = {"prepare": 0, "score": 1, "flaky": 1}
        shown = {tid: f"task={tid} stage={k} run={run_id}" for tid, k in stage.items()}
        executes = {shown_args(t): t for t in by_name["taskexec.execute"]}
        assert set(executes) == set(shown.values())
        for tid in stage:
            task = executes[shown[tid]]
            assert task["uuid"].startswith(f"{run_id}/{tid}/"), task["uuid"]
            assert task["routing_key"] == "executor" and task["worker"] == nodes["executor"]
        assert executes[shown["flaky"]]["retries"] == 1, "the retry shows in Flower"
        # What taskexec itself sends reads run=… task=… stage=… in the API too.
        assert executes[shown["prepare"]]["args"] == f"run={run_id} task=prepare stage=0"
        assert {shown_args(t) for t in by_name["taskexec.advance"]} == {
            f"stage={k} run={run_id}" for k in (1, 2)
        }
        assert {shown_args(t) for t in by_name["taskexec.dispatch"]} == {f"stage=0 run={run_id}"}
        (validate,) = by_name["taskexec.validate"]
        assert shown_args(validate) == shown["score"]
        assert validate["routing_key"] == "validator" and validate["worker"] == nodes["validator"]
        # Messages carry ids: no param of the plan reaches Flower, in args, kwargs or results.
        assert MARKER not in json.dumps(found)

        # A wait for a token is a Celery retry that shows its reason, and spends no attempt.
        def throttled() -> dict[str, Any] | None:
            tasks = get_json(f"{base}/api/tasks?limit=1000&taskname=taskexec.execute").values()
            mine = [t for t in tasks if t["uuid"].startswith(f"{limited.run_id}/limited/")]
            return mine[0] if mine and mine[0]["state"] == "SUCCESS" else None

        wait_for(lambda: throttled() is not None, timeout=30, what="the throttled task in Flower")
        task = throttled()
        assert task is not None and task["retries"] >= 1
        assert f"Throttled(\"rate limit '{LIMIT_NAME}': " in task["exception"], task["exception"]
        assert limited.tasks[0].attempts == 1

        # The tasks page (what the README's screenshot shows) loads its rows from
        # /tasks/datatable, where format_task applies: every row of ours reads task=/stage= run=….
        assert get(f"{base}/tasks")[0] == 200
        query = "draw=1&start=0&length=500&order%5B0%5D%5Bcolumn%5D=0&columns%5B0%5D%5Bdata%5D=received"
        rows = [
            r for r in get_json(f"{base}/tasks/datatable?{query}")["data"] if run_id in r["args"] + r["uuid"]
        ]
        assert len(rows) == len(found)
        assert all(re.fullmatch(rf"(task=\S+ )?stage=\S+ run={run_id}", r["args"]) for r in rows), [
            r["args"] for r in rows
        ]

        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    assert list(tmp_path.glob("flower.db*")), "persistent mode saved its state file on TERM"


#: A broker setting for commands that refuse (or are stopped) before connecting to it.
NO_AUTH_ENV: dict[str, str | None] = {
    "TASKEXEC_BROKER_URL": "redis://127.0.0.1:6379/15",
    "TASKEXEC_FLOWER_BASIC_AUTH": None,
    "FLOWER_BASIC_AUTH": None,
    "FLOWER_AUTH": None,
}


def test_flower_refuses_a_public_address_without_auth() -> None:
    for address in ("0.0.0.0", "", "10.1.2.3"):
        result = CliRunner().invoke(main, ["flower", "--address", address], env=NO_AUTH_ENV)
        assert result.exit_code == 2, result.output
        assert "E001 --address" in result.output and "TASKEXEC_FLOWER_BASIC_AUTH" in result.output


def test_flower_rejects_malformed_credentials() -> None:
    env = {**NO_AUTH_ENV, "TASKEXEC_FLOWER_BASIC_AUTH": "just-a-user"}
    result = CliRunner().invoke(main, ["flower"], env=env)
    assert result.exit_code == 2 and "user:password" in result.output


def test_flower_needs_a_broker() -> None:
    result = CliRunner().invoke(main, ["flower"], env={**NO_AUTH_ENV, "TASKEXEC_BROKER_URL": None})
    assert result.exit_code == 2 and "TASKEXEC_BROKER_URL" in result.output


def test_unauthenticated_public_flower_warns_and_credentials_stay_off_argv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery.bin.celery import celery

    started: list[tuple[list[str], str | None]] = []

    def start(args: list[str], **_: object) -> None:
        started.append((list(args), os.environ.get("FLOWER_BASIC_AUTH")))

    monkeypatch.setattr(celery, "main", start)
    result = CliRunner().invoke(
        main, ["flower", "--address", "0.0.0.0", "--unauthenticated"], env=NO_AUTH_ENV
    )
    assert result.exit_code == 0, result.output
    assert "WITHOUT authentication" in result.output
    ((argv, auth),) = started
    assert argv[:3] == ["-A", "taskexec.celery_app", "flower"] and "--address=0.0.0.0" in argv
    assert auth is None

    started.clear()
    env = {**NO_AUTH_ENV, "TASKEXEC_FLOWER_BASIC_AUTH": "ops:pw-" + MARKER}
    result = CliRunner().invoke(main, ["flower", "--address", "0.0.0.0", "--read-only"], env=env)
    assert result.exit_code == 0, result.output
    assert "WITHOUT" not in result.output
    ((argv, auth),) = started
    assert not any(MARKER in a for a in argv), "credentials travel in the environment, not argv"
    assert auth == "ops:pw-" + MARKER, "Flower reads FLOWER_BASIC_AUTH itself"
    assert "--read_only=True" in argv


def test_flower_argv_persists_state_and_shows_args() -> None:
    argv = flower_argv(5555, "127.0.0.1", state_file="/var/lib/taskexec/flower.db")
    assert "--persistent=True" in argv and "--db=/var/lib/taskexec/flower.db" in argv
    columns = next(a for a in argv if a.startswith("--tasks_columns=")).split("=", 1)[1].split(",")
    assert {"name", "state", "args"} <= set(columns) and "kwargs" not in columns and "result" not in columns


@pytest.mark.parametrize(
    ("name", "args", "shown"),
    [
        (
            "taskexec.validate",
            "({'run_id': 'r1', 'task_id': 'score[0]', 'status': 'validating'},)",
            "task=score[0] run=r1",
        ),
        ("taskexec.execute", "('r1', 'flaky')", "task=flaky run=r1"),  # a Celery retry's re-send
        ("taskexec.execute", "run=r1 task=a b[0]", "task=a b[0] run=r1"),  # taskexec's argsrepr
        ("taskexec.stage_failed", "('r1', 2)", "stage=2 run=r1"),
        ("taskexec.advance", "run=r1 stage=3", "stage=3 run=r1"),
        ("taskexec.advance", "('r1', 2, 3)", "('r1', 2, 3)"),
        ("taskexec.execute", "not python", "not python"),
        ("other.task", "('r1', 2)", "('r1', 2)"),
    ],
)
def test_flower_task_format(name: str, args: str, shown: str) -> None:
    task = SimpleNamespace(name=name, args=args)
    assert flower_task_format(task).args == shown


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("", False), ("::", False), ("10.0.0.5", False), ("flower.internal", False)],
)  # fmt: skip
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_flower_says_where_it_listens_and_whether_its_api_needs_auth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15: a plain start answers 401 on /api/*; the start says so, and where it listens."""
    from celery.bin.celery import celery

    started: list[list[str]] = []
    monkeypatch.setattr(celery, "main", lambda args, **_: started.append(list(args)))
    env = {**NO_AUTH_ENV, "FLOWER_UNAUTHENTICATED_API": None}
    plain = CliRunner().invoke(main, ["flower", "--port", "5601"], env=env)
    assert plain.exit_code == 0, plain.output
    assert "http://127.0.0.1:5601/" in plain.output
    assert "/api/" in plain.output and "401" in plain.output and "TASKEXEC_FLOWER_BASIC_AUTH" in plain.output

    env = {**env, "TASKEXEC_FLOWER_BASIC_AUTH": "ops:pw"}
    authed = CliRunner().invoke(main, ["flower", "--port", "5601", "--url-prefix", "flower"], env=env)
    assert authed.exit_code == 0, authed.output
    assert "http://127.0.0.1:5601/flower/" in authed.output
    assert "basic auth" in authed.output and "401" not in authed.output
    assert len(started) == 2
