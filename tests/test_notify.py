"""Webhooks of run events, received by a local HTTP server from real worker processes."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sqlalchemy as sa

from taskexec import Client, RunStatus, parse_plan
from taskexec.settings import Settings
from taskexec.store.tables import ExecutionLog
from tests.conftest import Fleet, make_fleet_env, wait_for
from workers.netguard import Allowance
from workers.notify import Attempt, backoff, post, sign, where

pytestmark = [pytest.mark.integration]

SECRET = "webhook-test-secret"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records POSTs and answers as each path is scripted."""

    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    #: path -> statuses of its successive answers (the last one repeats); default 200
    answers: dict[str, list[int]] = field(default_factory=dict)
    #: path -> event the first request of that path waits for before it is answered
    holds: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def answer(self, path: str) -> int:
        with self.lock:
            n = sum(1 for r in self.requests if r.path == path)
            script = self.answers.get(path, [200])
            return script[min(n - 1, len(script) - 1)]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with receiver.lock:
                receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
                first = sum(1 for r in receiver.requests if r.path == self.path) == 1
            hold = receiver.holds.get(self.path)
            if hold is not None and first:
                hold.wait(timeout=30)
            self.send_response(receiver.answer(self.path))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler))
    rec.server.RequestHandlerClass = _handler(rec)
    thread = threading.Thread(target=rec.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        for event in rec.holds.values():
            event.set()
        rec.server.shutdown()
        rec.server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def fleet(redis_db: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One worker process (executor + control) that signs webhooks and retries them quickly."""
    tmp = tmp_path_factory.mktemp("notify")
    env = {
        **make_fleet_env(redis_db, pg_url, tmp / "home"),
        "TASKEXEC_WEBHOOK_SECRET": SECRET,
        "TASKEXEC_WEBHOOK_BACKOFF": "0.2",
        "TASKEXEC_WEBHOOK_TIMEOUT": "40",
        # The receiver listens on loopback, which webhooks may reach only when allowed.
        "TASKEXEC_HTTP_ALLOW": "127.0.0.1",
    }
    f = Fleet(env, tmp)
    try:
        f.start("executor", 2, "notify-exec")
        yield f
    finally:
        f.stop()


@pytest.fixture
def client(fleet: Fleet) -> Iterator[Client]:
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    with Client(settings) as c:
        yield c


def notify_logs(client: Client, run_id: str) -> list[str]:
    """The ``notify`` lines of a run's history, oldest first."""
    stmt = (
        sa.select(ExecutionLog.message)
        .where(ExecutionLog.run_id == run_id, ExecutionLog.event == "notify")
        .order_by(ExecutionLog.id)
    )
    with client.store.begin() as s:
        return [m or "" for m in s.scalars(stmt)]


def assert_signed(r: Received) -> None:
    expected = "sha256=" + hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(r.headers["X-Taskexec-Signature"], expected)
    assert r.headers["Content-Type"] == "application/json"
    assert int(r.headers["X-Taskexec-Timestamp"]) > 0


def test_run_finished_is_signed_retried_after_a_500_and_never_waited_for(
    fleet: Fleet, client: Client, receiver: Receiver
) -> None:
    receiver.answers["/flaky"] = [500, 200]
    receiver.holds["/flaky"] = threading.Event()
    plan = parse_plan(
        {
            "id": "notified",
            "notify": [{"url": receiver.url("/flaky")}, {"url": receiver.url("/steady?token=t0ps3cret")}],
            "tasks": [{"id": "a", "handler": "stub", "params": {"output": {"ok": True}}}],
        }
    )
    run = client.submit(plan)
    # The first POST is held unanswered: the run has ended all the same.
    wait_for(lambda: receiver.at("/flaky"), timeout=30, what="the first webhook POST")
    assert run.status().status is RunStatus.SUCCEEDED
    receiver.holds["/flaky"].set()

    wait_for(lambda: len(receiver.at("/flaky")) >= 2, timeout=30, what="the retry after a 500")
    wait_for(
        lambda: any("/flaky: delivered" in m for m in notify_logs(client, run.run_id)),
        timeout=15,
        what="the delivery log line",
    )
    first, second = receiver.at("/flaky")
    for r in (first, second):
        assert_signed(r)
    assert first.body == second.body  # a retry sends the same bytes...
    assert (
        first.headers["X-Taskexec-Delivery"] == second.headers["X-Taskexec-Delivery"]
    )  # ...as the same delivery
    event = first.json
    assert event["event"] == "run_finished" and first.headers["X-Taskexec-Event"] == "run_finished"
    assert event["run_id"] == run.run_id and event["plan_id"] == "notified" and event["variant"] == "default"
    assert event["status"] == "succeeded"
    assert event["statistics"]["total"] == 1 and event["statistics"]["succeeded"] == 1
    assert event["delivery_id"] == first.headers["X-Taskexec-Delivery"]

    # The other URL answered at once: the retry of /flaky never sent it a second copy.
    steady = [r for r in receiver.requests if r.path.startswith("/steady")]
    assert len(steady) == 1
    assert_signed(steady[0])
    assert steady[0].headers["X-Taskexec-Delivery"] != first.headers["X-Taskexec-Delivery"]

    logs = notify_logs(client, run.run_id)
    assert any("/flaky: attempt 1: HTTP 500; retry in" in m for m in logs), logs
    assert any("/steady: delivered (HTTP 200)" in m for m in logs), logs
    assert not any("t0ps3cret" in m for m in logs)  # query strings (tokens) stay out of the logs


def test_task_failed_events_and_a_4xx_is_not_retried(
    fleet: Fleet, client: Client, receiver: Receiver
) -> None:
    receiver.answers["/gone"] = [404]
    plan = parse_plan(
        {
            "id": "failing",
            "notify": [
                {"url": receiver.url("/events"), "events": ["task_failed", "run_finished"]},
                {"url": receiver.url("/gone"), "events": ["task_failed"]},
            ],
            "tasks": [
                {"id": "ok", "handler": "stub"},
                {
                    "id": "bad",
                    "handler": "stub",
                    "params": {"behavior": "failure"},
                    "retry": {"max_attempts": 1},
                },
            ],
        }
    )
    result = client.submit(plan).wait(timeout=60)
    assert result.status is RunStatus.FAILED

    wait_for(lambda: len(receiver.at("/events")) >= 2, timeout=30, what="task_failed and run_finished")
    by_event = {r.json["event"]: r for r in receiver.at("/events")}
    assert set(by_event) == {"task_failed", "run_finished"}
    for r in by_event.values():
        assert_signed(r)
    failed = by_event["task_failed"].json
    assert failed["run_id"] == result.run_id
    assert failed["task"] == {
        "id": "bad",
        "status": "failed",
        "attempts": 1,
        "error_code": "E003",
        "error_message": failed["task"]["error_message"],
    }
    assert "behavior failure" in failed["task"]["error_message"]
    finished = by_event["run_finished"].json
    assert finished["status"] == "failed"
    assert finished["statistics"]["failed"] == 1 and finished["statistics"]["succeeded"] == 1

    wait_for(
        lambda: any(
            "/gone: gave up after 1 attempt(s), not retried: HTTP 404" in m
            for m in notify_logs(client, result.run_id)
        ),
        timeout=15,
        what="the 404 to be given up",
    )
    assert len(receiver.at("/gone")) == 1


def test_a_post_is_judged_by_its_status(receiver: Receiver) -> None:
    receiver.answers.update({"/ok": [204], "/busy": [429], "/down": [503], "/nope": [401], "/moved": [301]})
    loopback = Allowance.parse(["127.0.0.1"])
    judged = {p: post(receiver.url(p), b"{}", {}, 5, loopback).verdict for p in receiver.answers}
    assert judged == {
        "/ok": "delivered",
        "/busy": "retry",
        "/down": "retry",
        "/nope": "give_up",
        "/moved": "give_up",
    }
    refused = post("http://127.0.0.1:1/x", b"{}", {}, 2, loopback)
    assert isinstance(refused, Attempt) and refused.verdict == "retry"


@pytest.mark.parametrize(
    "url",
    ["/hook", "http://localhost:{port}/hook", "http://169.254.169.254/latest/meta-data/", "http://[::1]:9/"],
)
def test_a_webhook_to_an_address_not_allowed_gives_up_and_sends_nothing(receiver: Receiver, url: str) -> None:
    port = receiver.server.server_address[1]
    target = receiver.url(url) if url.startswith("/") else url.format(port=port)
    attempt = post(target, b"{}", {}, 2)  # no allowance: public addresses only
    assert attempt.verdict == "give_up", attempt
    assert "refused to connect" in attempt.detail and "TASKEXEC_HTTP_ALLOW" in attempt.detail
    assert receiver.at("/hook") == []


def test_signature_backoff_and_logged_urls() -> None:
    body = b'{"event":"run_finished"}'
    assert sign(body, "k") == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert [round(backoff(n, 1.0, _Max()), 3) for n in (1, 2, 3, 20)] == [1.0, 2.0, 4.0, 600.0]
    assert where("https://user:pw@hooks.example:8443/a/b?token=x") == "https://hooks.example:8443/a/b"


class _Max(random.Random):
    """A random source whose uniform() is the top of its range: the undamped delay."""

    def uniform(self, a: float, b: float) -> float:
        return b
