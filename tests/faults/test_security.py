"""Attacks from a plan, on real processes: what a plan can reach is what the operator allows.

Whoever may submit a plan must not be able to read the worker's secrets or settings
(`TASKEXEC_SECRETS`), its environment from a shell step (a clean environment, and
`TASKEXEC_SHELL_USER`), internal addresses through the `http` handler or webhooks
(`TASKEXEC_HTTP_ALLOW`), nor make a producer or a worker run out of memory with a plan
(alias bombs, deep nesting). Each case runs the fleet's real worker processes against the
suite's private Redis and PostgreSQL; docs/reliability.md ("trust model") lists them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import redis
import sqlalchemy as sa

from taskexec import Client, RunManifest, RunResult, TaskStatus, compile_plan, parse_plan
from taskexec.settings import Settings
from tests.faults.conftest import World, logs_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]
#: A second canary with the characters that URL, JSON and shell quoting change.
SPECIAL = 'sec"ret/ \\p@ss+w&rd=9é'
#: A variable of the worker's host that no plan is allowed to read.
OTHER = "sk-other-team-5a1e0c"


def client_of(world: World) -> Client:
    settings = world.fleet.settings()
    assert isinstance(settings, Settings)
    return Client(settings)


def sql(world: World, query: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(world.pg.url.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(query), params))
    finally:
        engine.dispose()


def run(world: World, plan: dict[str, Any] | RunManifest, timeout: float = 60) -> RunResult:
    with client_of(world) as client:
        handle = client.submit(plan if isinstance(plan, RunManifest) else parse_plan(plan))
        result = client.wait(handle.run_id, timeout=timeout)
    assert result.status.terminal, result
    return result


def tasks_of(result: RunResult) -> dict[str, Any]:
    return {t.id: t for t in result.tasks}


@dataclass
class Listener:
    """An HTTP server on a loopback address that records every request it gets."""

    server: ThreadingHTTPServer
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


@contextmanager
def listening(host: str = "127.0.0.1", redirect: bool = False) -> Iterator[Listener]:
    """A listener; with ``redirect``, ``/go?to=URL`` answers 302 to URL, anything else 200."""
    box: list[Listener] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            box[0].seen.append((self.command, self.path, dict(self.headers), body))
            if redirect and "?to=" in self.path:
                self.send_response(302)
                self.send_header("Location", self.path.split("?to=", 1)[1])
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = _any  # noqa: N815 - http.server's names

        def log_message(self, *args: Any) -> None:
            pass

    listener = Listener(ThreadingHTTPServer((host, 0), Handler))
    box.append(listener)
    thread = threading.Thread(target=listener.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        listener.server.shutdown()
        listener.server.server_close()
        thread.join(timeout=5)


def start_worker(world: World, name: str = "w1", **env: str) -> subprocess.Popen[bytes]:
    world.fleet.env.update(env)
    proc = world.fleet.spawn("executor,validator", 1, name)
    world.fleet.wait_ready(name)
    return proc


def stop_worker(world: World, proc: subprocess.Popen[bytes]) -> None:
    world.fleet.kill(proc, 15)
    proc.wait(timeout=30)


# ---------------------------------------------------------------- secrets (issue 13, item 5)


def test_a_plan_cannot_send_the_worker_settings_or_a_secret_not_allowed(world: World) -> None:
    """Through the http handler to a listener the operator allows: only the secret rule stops them."""
    with listening() as listener:
        start_worker(world, TASKEXEC_HTTP_ALLOW="127.0.0.1", OTHER_TEAM_KEY=OTHER)

        def http(tid: str, **params: Any) -> dict[str, Any]:
            return {"id": tid, "handler": "http", "retry": {"max_attempts": 2}, "params": params}

        doc = {
            "tasks": [
                http("allowed", url=f"{listener.url}/ok", headers={"X-Key": {"secret": "CANARY_SECRET"}}),
                http("db_url", url=f"{listener.url}/a", headers={"X-Leak": {"secret": "PLACEHOLDER_A"}}),
                http("other", url=f"{listener.url}/b", json={"k": {"secret": "OTHER_TEAM_KEY"}}),
                {
                    **http("webhook_key", url=f"{listener.url}/c", key="PLACEHOLDER_B"),
                    "secret_params": ["key"],
                },
            ]
        }
        # `taskexec validate` refuses TASKEXEC_* names already: the manifest is made by hand, as
        # a producer that skips validation (or a message forged on the broker) would.
        [manifest] = compile_plan(parse_plan(doc), world.fleet.settings())  # type: ignore[arg-type]
        swap = {"PLACEHOLDER_A": "TASKEXEC_DATABASE_URL", "PLACEHOLDER_B": "TASKEXEC_WEBHOOK_SECRET"}
        raw = json.dumps(manifest.model_dump(mode="json", by_alias=True))
        for placeholder, name in swap.items():
            raw = raw.replace(placeholder, name)
        started = time.monotonic()
        result = run(world, RunManifest.model_validate(json.loads(raw)))
        spent = time.monotonic() - started

    tasks = tasks_of(result)
    assert tasks["allowed"].status is TaskStatus.SUCCEEDED, tasks["allowed"]
    expected = {
        "db_url": "params.headers.X-Leak: $TASKEXEC_DATABASE_URL is a setting of the worker",
        "other": "params.json.k: the secret $OTHER_TEAM_KEY is not allowed on this worker",
        "webhook_key": "params.key: $TASKEXEC_WEBHOOK_SECRET is a setting of the worker",
    }
    for tid, words in expected.items():
        t = tasks[tid]
        assert (t.status, t.error_code, t.attempts) == (TaskStatus.FAILED, "E001", 1), t
        assert t.error_message is not None and t.error_message.startswith(words), t.error_message
    # The listener got the allowed request, and nothing else: no header, no body, no retry.
    assert [path for _, path, _, _ in listener.seen] == ["/ok"]
    received = json.dumps([(h, b.decode()) for _, _, h, b in listener.seen])
    assert world.fleet.env["TASKEXEC_DATABASE_URL"] not in received and OTHER not in received
    print(f"secrets refused in a run of {spent:.2f} s")


# ---------------------------------------------------------------- shell environment (item 6)

ENV_ONLY = 'env; echo "-- uid=$(id -u)"'
#: As the worker's own user this would print the worker's environment: only run as another.
ENV_AND_PARENT = 'env; echo "-- uid=$(id -u)"; cat /proc/$PPID/environ; echo "proc=$?"'
ALLOWED_NAMES = {
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PWD", "SHLVL", "_",
    "TASKEXEC_RUN_ID", "TASKEXEC_TASK_ID", "TASKEXEC_ATTEMPT", "TASKEXEC_IDEMPOTENCY_KEY",
    "TASKEXEC_PARAMS", "MINE",
}  # fmt: skip


def _shell_env(result: RunResult) -> tuple[dict[str, str], str]:
    [t] = result.tasks
    assert t.status is TaskStatus.SUCCEEDED, t
    out = t.output["stdout"]
    env = dict(line.split("=", 1) for line in out.split("\n-- uid=")[0].splitlines() if "=" in line)
    return env, out


def shell_plan(script: str) -> dict[str, Any]:
    return {
        "tasks": [
            {"id": "env", "handler": "shell", "params": {"argv": ["sh", "-c", script], "env": {"MINE": "1"}}}
        ]
    }


def test_a_shell_step_sees_none_of_the_worker_environment(world: World) -> None:
    worker_values = [
        world.fleet.env["TASKEXEC_DATABASE_URL"],
        world.fleet.env["TASKEXEC_BROKER_URL"],
        world.fleet.env["CANARY_SECRET"],
        OTHER,
    ]
    started = time.monotonic()
    # 1. The worker's own user: the environment is clean; its parent's /proc entry is not.
    first = start_worker(world, "w1", OTHER_TEAM_KEY=OTHER)
    env, _ = _shell_env(run(world, shell_plan(ENV_ONLY)))
    assert set(env) <= ALLOWED_NAMES and {"PATH", "MINE", "TASKEXEC_RUN_ID"} <= set(env), sorted(env)
    assert not any(v in value for v in worker_values for value in env.values())
    stop_worker(world, first)
    # 2. TASKEXEC_SHELL_USER=nobody: the kernel refuses it the worker's /proc entries.
    start_worker(world, "w2", TASKEXEC_SHELL_USER="nobody")
    result = run(world, shell_plan(ENV_AND_PARENT))
    env, out = _shell_env(result)
    assert set(env) <= ALLOWED_NAMES and env["HOME"] == "/nonexistent" and env["PWD"] == "/tmp", sorted(env)
    assert "-- uid=65534\nproc=1" in out, out
    assert "Permission denied" in result.tasks[0].output["stderr"]
    everything = json.dumps(result.model_dump(mode="json"))
    assert not any(v in everything for v in worker_values), "a worker value reached the step"
    print(f"shell environment, both users: {time.monotonic() - started:.2f} s")


# ---------------------------------------------------------------- encodings of secrets (item 7)


def encodings(secret: str) -> dict[str, str]:
    """Forms of ``secret`` a command may print; base64 also inside longer streams (3 offsets)."""
    data = secret.encode()
    return {
        "plain": secret,
        "reversed": secret[::-1],
        "base64": base64.b64encode(data).decode(),
        "base64url": base64.urlsafe_b64encode(data).decode().rstrip("="),
        "base64, offset 1": base64.b64encode(b"<" + data + b">").decode(),
        "base64, offset 2": base64.b64encode(b"<<" + data + b">>>").decode(),
        "base64, offset 3": base64.b64encode(b"<<<" + data).decode(),
        "hex": data.hex(),
        "HEX": data.hex().upper(),
        "url": quote(secret, safe=""),
        "url, form": quote_plus(secret),
        "json": json.dumps(secret)[1:-1],
        "json, utf-8": json.dumps(secret, ensure_ascii=False)[1:-1],
    }


PRINT_ENCODED = """
import base64, json, os, sys
from urllib.parse import quote, quote_plus
forms = []
for name in ("CANARY", "SPECIAL"):
    s = os.environ[name]
    d = s.encode()
    forms += [s, s[::-1], base64.b64encode(d).decode(), base64.urlsafe_b64encode(d).decode().rstrip("="),
              base64.b64encode(b"<" + d + b">").decode(), base64.b64encode(b"<<" + d + b">>>").decode(),
              base64.b64encode(b"<<<" + d).decode(), d.hex(), d.hex().upper(), quote(s, safe=""),
              quote_plus(s), json.dumps(s)[1:-1], json.dumps(s, ensure_ascii=False)[1:-1]]
print("\\n".join(forms))
print(" | ".join(forms), file=sys.stderr)
if os.environ["TASKEXEC_ATTEMPT"] == "1":
    sys.exit("failed with " + forms[2] + " and " + forms[-1])
"""


def redis_text(r: redis.Redis, key: bytes) -> str:
    """A key's whole value as text, read by type (DUMP may compress it)."""
    kind = r.type(key).decode()
    parts: Any
    if kind == "string":
        parts = [r.get(key)]
    elif kind == "list":
        parts = r.lrange(key, 0, -1)
    elif kind == "hash":
        parts = [b for kv in r.hgetall(key).items() for b in kv]
    elif kind == "set":
        parts = list(r.smembers(key))
    elif kind == "zset":
        parts = r.zrange(key, 0, -1)
    elif kind == "stream":
        parts = [
            json.dumps({k.decode(): v.decode("latin-1") for k, v in e[1].items()}).encode()
            for e in r.xrange(key)
        ]
    else:
        parts = [r.dump(key)]
    return "\n".join((p or b"").decode("latin-1") for p in parts)


def test_encoded_canaries_reach_no_row_key_event_log_or_report(world: World) -> None:
    world.fleet.env["TASKEXEC_SECRETS"] = "CANARY_SECRET,SECURITY_CANARY"
    start_worker(world, SECURITY_CANARY=SPECIAL)
    canary = world.fleet.env["CANARY_SECRET"]
    forms = {
        f"{k} of {name}": v
        for name, s in (("canary", canary), ("special", SPECIAL))
        for k, v in encodings(s).items()
    }
    r = world.redis.client()
    events: list[bytes] = []
    pubsub = r.pubsub()
    pubsub.psubscribe("*")
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "pmessage":
                events.append(message["data"])

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        result = run(
            world,
            {
                "tasks": [
                    {
                        "id": "leaky",
                        "handler": "shell",
                        "retry": {"max_attempts": 2, "backoff": 0.1},
                        "params": {
                            "argv": ["python3", "-c", PRINT_ENCODED],
                            "env": {
                                "CANARY": {"secret": "CANARY_SECRET"},
                                "SPECIAL": {"secret": "SECURITY_CANARY"},
                            },
                            "parse_json": False,
                        },
                    }
                ]
            },
        )
    finally:
        time.sleep(0.5)  # the last events of the run
        stop.set()
        thread.join(timeout=5)
        pubsub.close()
    [leaky] = result.tasks
    assert leaky.status is TaskStatus.SUCCEEDED and leaky.attempts == 2, leaky
    assert leaky.output["stdout"].count("***") >= 2 * len(encodings(canary)), leaky.output["stdout"]
    assert len(events) >= 4, "the subscriber heard the run"

    places: dict[str, str] = {}
    for table in ("runs", "executions", "execution_logs", "execution_metrics", "attempt_logs"):
        places[f"table {table}"] = json.dumps(
            [list(map(str, row)) for row in sql(world, f"SELECT * FROM {table}")]
        )
    for key in r.scan_iter(count=1000):
        places[f"Redis key {key!r}"] = redis_text(r, key)
    r.close()
    places["pub/sub events"] = "\n".join(e.decode() for e in events)
    places["worker logs"] = logs_of(world)
    for fmt in ("junit", "html", "json"):
        shown = subprocess.run(
            [sys.executable, "-m", "taskexec.cli", "results", result.run_id, "--format", fmt],
            env=world.fleet.env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        assert shown.returncode in (0, 1) and "leaky" in shown.stdout, shown.stderr
        places[f"{fmt} report"] = shown.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "taskexec.cli", "logs", result.run_id, "--json"],
        env=world.fleet.env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert shown.returncode == 0 and '"stream":"stdout"' in shown.stdout, shown.stderr
    places["taskexec logs"] = shown.stdout
    for where, text in places.items():
        for form, value in forms.items():
            # Stored as text, as JSON (escaped), or as UTF-8 bytes read as Latin-1.
            for seen in {value, value.encode().decode("latin-1"), json.dumps(value)[1:-1]}:
                assert seen not in text, f"the {form} is in the {where}"
    print(f"encoded canaries: {time.monotonic() - started:.2f} s, {len(places)} places searched")


# ---------------------------------------------------------------- SSRF (item 8)


def test_http_and_webhooks_reach_no_internal_address_unless_allowed(world: World) -> None:
    with listening("127.0.0.1") as inside, listening("127.0.0.2", redirect=True) as allowed:
        port = inside.server.server_address[1]

        def http(tid: str, url: str) -> dict[str, Any]:
            return {"id": tid, "handler": "http", "retry": {"max_attempts": 2}, "params": {"url": url}}

        doc = {
            "notify": [{"url": f"{inside.url}/hook", "events": ["run_finished"]}],
            "tasks": [
                http("loopback", f"{inside.url}/x"),
                http("metadata", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
                http("redirect", f"{allowed.url}/go?to={inside.url}/y"),
                http("by_name", f"http://localhost:{port}/z"),
                http("allowed", f"{allowed.url}/ok"),
            ],
        }
        started = time.monotonic()
        first = start_worker(world, "w1", TASKEXEC_HTTP_ALLOW="127.0.0.2")
        result = run(world, doc)
        tasks = tasks_of(result)
        assert tasks["allowed"].status is TaskStatus.SUCCEEDED, tasks["allowed"]
        refused = {
            "loopback": "127.0.0.1, a loopback address",
            "metadata": "169.254.169.254, a cloud metadata address",
            "redirect": "127.0.0.1, a loopback address",
            "by_name": "localhost at 127.0.0.1, a loopback address",
        }
        for tid, words in refused.items():
            t = tasks[tid]
            assert (t.status, t.error_code, t.attempts) == (TaskStatus.FAILED, "E001", 1), t
            assert words in (t.error_message or "") and "TASKEXEC_HTTP_ALLOW" in (t.error_message or "")

        def notified() -> list[str]:
            rows = sql(
                world,
                "SELECT message FROM execution_logs WHERE run_id = :r AND event = 'notify'",
                r=result.run_id,
            )
            return [m for (m,) in rows]

        deadline = time.monotonic() + 30
        while not notified() and time.monotonic() < deadline:
            time.sleep(0.1)
        [line] = notified()
        assert "gave up after 1 attempt(s), not retried: refused to connect to 127.0.0.1" in line, line
        assert inside.seen == [], "nothing reached the loopback listener"
        assert sorted(p for _, p, _, _ in allowed.seen) == sorted([f"/go?to={inside.url}/y", "/ok"])
        refused_at = time.monotonic() - started

        # Allowed by the operator, the same requests go through.
        stop_worker(world, first)
        start_worker(world, "w2", TASKEXEC_HTTP_ALLOW="127.0.0.1,127.0.0.2")
        again = run(world, {**doc, "tasks": [t for t in doc["tasks"] if t["id"] != "metadata"]})
        assert all(t.status is TaskStatus.SUCCEEDED for t in again.tasks), again.tasks
        deadline = time.monotonic() + 30
        while not any(p == "/hook" for _, p, _, _ in inside.seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(p for _, p, _, _ in inside.seen) == ["/hook", "/x", "/y", "/z"]
    print(f"SSRF: refused in {refused_at:.2f} s, allowed in {time.monotonic() - started - refused_at:.2f} s")


# ---------------------------------------------------------------- hostile plans (item 9)

MEASURE = """
import json, resource, subprocess, sys, time
started = time.monotonic()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=90)
spent = time.monotonic() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": p.returncode, "err": p.stderr, "seconds": spent, "peak_kib": peak}))
"""


def measured(world: World, *args: str) -> dict[str, Any]:
    """A `taskexec` command's exit code, output, wall time and peak RSS (its own process only)."""
    argv = [sys.executable, "-c", MEASURE, sys.executable, "-m", "taskexec.cli", *args]
    proc = subprocess.run(
        argv, env=world.fleet.env, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT
    )
    found: dict[str, Any] = json.loads(proc.stdout)
    return found


def billion_laughs() -> str:
    lines = ["tasks:", "  - id: lol", "    handler: stub", "    params:"]
    lines.append('      a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"      {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bombs_and_deep_nesting_are_refused_fast_in_bounded_memory(world: World) -> None:
    bomb = world.dir / "bomb.yaml"
    bomb.write_text(billion_laughs())
    deep = world.dir / "deep.json"
    deep.write_text(
        '{"tasks": [{"id": "x", "handler": "stub", "params": {"p": ' + "[" * 1000 + "]" * 1000 + "}}]}"
    )
    small = world.dir / "small.yaml"
    small.write_text("tasks: [{id: a, handler: stub}]\n")
    assert bomb.stat().st_size <= 450
    baseline = measured(world, "validate", str(small))
    assert baseline["code"] == 0, baseline
    runs_before = sql(world, "SELECT count(*) FROM runs")[0][0]
    figures = []
    for path, words in ((deep, "more than 100 levels deep"), (bomb, "YAML aliases expand the plan")):
        for command in ("validate", "submit"):
            got = measured(world, command, str(path))
            assert got["code"] == 2, got
            assert got["err"].startswith(f"taskexec: E001 {path}: ") and words in got["err"], got["err"]
            assert "Traceback" not in got["err"]
            # The CLI's own start (imports) is the baseline: the plan adds next to nothing (3 ms
            # in process, tests/test_plan.py); the margin is for a busy machine.
            assert got["seconds"] < max(2 * baseline["seconds"], baseline["seconds"] + 2), (got, baseline)
            assert got["peak_kib"] < baseline["peak_kib"] + 20 * 1024, (got["peak_kib"], baseline["peak_kib"])
            figures.append(f"{path.name} {command}: {got['seconds']:.2f} s, {got['peak_kib'] / 1024:.0f} MiB")
    assert sql(world, "SELECT count(*) FROM runs")[0][0] == runs_before, "nothing was submitted"
    print(
        f"baseline validate {baseline['seconds']:.2f} s, {baseline['peak_kib'] / 1024:.0f} MiB; "
        + "; ".join(figures)
    )
