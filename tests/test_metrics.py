"""``taskexec metrics``: the exporter against a live fleet, and its bookkeeping on its own.

The live test starts real workers (the ``fleet`` fixture) and ``taskexec metrics --port 0``,
runs a plan with a retry, a validation and two stage gaps through :class:`Client`, and
scrapes ``/metrics`` until our counters show it. The other tests drive the run-event
bookkeeping with a fake clock, and the queue-length collector against the test Redis.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskexec import Client, RunStatus, parse_plan
from taskexec.celery_app import QUEUES, create_app
from taskexec.cli import main
from taskexec.metrics import FleetMetrics, QueueBacklog, RunEvents, priority_lists
from taskexec.run.events import channel
from taskexec.settings import Settings
from tests.conftest import ROOT, Fleet, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def registry_samples(registry: CollectorRegistry) -> Samples:
    from prometheus_client import generate_latest

    return samples(generate_latest(registry).decode())


# ---- run events, with a fake clock -----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def run_events() -> Iterator[tuple[RunEvents, CollectorRegistry, Clock, list[tuple[str, str, float | None]]]]:
    registry = CollectorRegistry()
    ended: list[tuple[str, str, float | None]] = []
    clock = Clock()
    yield RunEvents(FleetMetrics(registry), lambda *a: ended.append(a), clock=clock), registry, clock, ended


def event(run: str, task: str | None, status: str) -> dict[str, Any]:
    return {
        "run_id": run,
        "task_id": task,
        "status": status,
        "attempt": 1,
        "error_code": None,
        "message": None,
    }


def test_stage_gap_is_last_end_of_a_stage_to_first_start_of_the_next(
    run_events: tuple[RunEvents, CollectorRegistry, Clock, list[tuple[str, str, float | None]]],
) -> None:
    events, registry, clock, ended = run_events
    script: list[tuple[float, str | None, str]] = [
        (0.0, None, "queued"),
        (0.0, "a", "queued"),
        (0.0, "b", "queued"),
        (0.0, None, "running"),
        (0.1, "a", "running"),
        (0.1, "b", "running"),
        (0.5, "a", "succeeded"),
        (0.6, "b", "retrying"),  # still active: the stage is not over
        (0.7, "b", "running"),
        (1.0, "b", "succeeded"),  # stage 0 ends at 1.0
        (1.01, "c", "queued"),
        (1.02, "d", "skipped"),  # a skipped task never ran: it neither opens nor closes a gap
        (1.03, "c", "running"),  # stage 1 starts: gap 0.03
        (1.5, "c", "validating"),
        (1.6, "c", "succeeded"),
        (1.65, "e", "queued"),
        (1.7, "e", "running"),  # gap 0.1
        (1.8, "e", "succeeded"),
        (1.9, None, "succeeded"),
    ]
    for at, task, status in script:
        clock.now = 100.0 + at
        events.handle(event("r1", task, status))
    found = registry_samples(registry)
    assert value(found, "taskexec_stage_gap_seconds_count") == 2
    assert value(found, "taskexec_stage_gap_seconds_sum") == pytest.approx(0.13)
    assert value(found, "taskexec_task_transitions_total", status="running") == 5
    assert value(found, "taskexec_task_transitions_total", status="skipped") == 1
    assert value(found, "taskexec_runs_total", status="succeeded") == 1
    assert ended == [("r1", "succeeded", pytest.approx(1.9))]
    assert events.runs == {}, "an ended run is forgotten"


def test_throttled_waits_and_unknown_statuses(
    run_events: tuple[RunEvents, CollectorRegistry, Clock, list[tuple[str, str, float | None]]],
) -> None:
    events, registry, _, ended = run_events
    events.handle(event("r2", "a", "throttled"))
    events.handle(event("r2", "a", "throttled"))
    events.handle(event("r2", "a", "teleported"))
    events.handle(event("r2", None, "imploded"))
    events.handle(event("r2", None, "failed"))  # a run the exporter did not see start
    found = registry_samples(registry)
    assert value(found, "taskexec_throttled_total") == 2
    assert value(found, "taskexec_task_transitions_total", status="throttled") == 2
    assert value(found, "taskexec_task_transitions_total", status="other") == 1
    assert value(found, "taskexec_runs_total", status="other") == 1
    assert ended == [("r2", "failed", None)]


def test_runs_seen_mid_way_give_no_stage_gap(
    run_events: tuple[RunEvents, CollectorRegistry, Clock, list[tuple[str, str, float | None]]],
) -> None:
    events, registry, clock, _ = run_events
    for status in ("succeeded", "queued", "running"):  # no run-level event: joined mid-run
        clock.now += 1
        events.handle(event("r3", "a" if status == "succeeded" else "b", status))
    assert value(registry_samples(registry), "taskexec_stage_gap_seconds_count") == 0


def test_forgets_the_oldest_run_past_its_bound() -> None:
    events = RunEvents(FleetMetrics(CollectorRegistry()), max_runs=3)
    for n in range(5):
        events.handle(event(f"r{n}", None, "queued"))
    assert list(events.runs) == ["r2", "r3", "r4"]


# ---- queue lengths against the test Redis ----------------------------------------------


def test_a_tasks_wait_is_counted_whichever_of_its_events_arrives_first() -> None:
    import threading

    from celery.events.state import State

    from taskexec.metrics import TaskEvents

    registry = CollectorRegistry()
    events = TaskEvents(FleetMetrics(registry), State(), threading.Lock())

    def send(kind: str, uuid_: str, at: float) -> None:
        fields = {"name": "taskexec.execute", "routing_key": "executor"} if kind == "task-sent" else {}
        event = {
            "type": kind,
            "uuid": uuid_,
            "timestamp": at,
            "local_received": at,
            "hostname": "w1",
            "clock": 1,
        }
        events.handle(event | fields)

    send("task-sent", "a", 100.0)  # in order
    send("task-started", "a", 100.5)
    send("task-started", "b", 200.2)  # the worker's event is received first
    send("task-sent", "b", 200.0)
    send("task-sent", "c", 300.01)  # sent after the publish, started at once: -10 ms
    send("task-started", "c", 300.0)
    send("task-sent", "d", 400.0)  # another host's clock, 5 s behind: not a wait
    send("task-started", "d", 395.0)
    found = registry_samples(registry)
    ex = {"task": "taskexec.execute", "queue": "executor"}
    assert value(found, "taskexec_task_wait_seconds_count", **ex) == 3
    assert abs(value(found, "taskexec_task_wait_seconds_sum", **ex) - 0.7) < 1e-6


def test_priority_lists_are_kombus() -> None:
    options = create_app(Settings(broker_url="redis://127.0.0.1:6379/0")).conf.broker_transport_options
    assert priority_lists("executor", options) == ["executor"] + [f"executor:{p}" for p in range(1, 10)]


@pytest.mark.integration
def test_queue_length_sums_the_priority_lists(redis_db: str) -> None:
    options = create_app(Settings(broker_url=redis_db)).conf.broker_transport_options
    client = redis.Redis.from_url(redis_db)
    try:
        client.flushdb()
        client.rpush("executor", "m1")
        client.rpush("executor:4", "m2", "m3")
        client.rpush("validator:9", "m4")
        registry = CollectorRegistry()
        registry.register(QueueBacklog(client, {q: priority_lists(q, options) for q in QUEUES}))
        found = registry_samples(registry)
        assert value(found, "taskexec_queue_length", queue="executor") == 3
        assert value(found, "taskexec_queue_length", queue="validator") == 1
        assert ("taskexec_queue_length", frozenset({("queue", "control")})) in found
    finally:
        client.flushdb()
        client.close()


def test_queue_length_is_absent_when_redis_is_down() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    registry = CollectorRegistry()
    registry.register(QueueBacklog(client, {"executor": ["executor"]}))
    assert not any(name == "taskexec_queue_length" for name, _ in registry_samples(registry))


def test_metrics_needs_a_broker() -> None:
    result = CliRunner().invoke(main, ["metrics"], env={"TASKEXEC_BROKER_URL": None})
    assert result.exit_code == 2 and "TASKEXEC_BROKER_URL" in result.output


# ---- the exporter against a live fleet -------------------------------------------------


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line the process prints, within ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no line from taskexec metrics (exit {proc.poll()}): {line!r}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                continue
            line += chunk
    return line.decode().strip()


PLAN = {
    "id": "metrics-check",
    "tasks": [
        {"id": "prepare", "handler": "stub"},
        {
            "id": "score",
            "handler": "stub",
            "depends_on": ["prepare"],
            "matrix": {"strategy": "cartesian", "params": {"i": [0, 1, 2]}},
            "params": {"output": {"score": 0.9}},
            "validate": [{"path": "score", "op": ">=", "value": 0.8}],
        },
        {
            "id": "flaky",
            "handler": "stub",
            "depends_on": ["prepare"],
            "params": {"fail_attempts": 1},
            "retry": {"max_attempts": 3, "backoff": 0.05, "multiplier": 1.0, "jitter": False},
        },
        {"id": "report", "handler": "stub", "depends_on": ["score", "flaky"]},
    ],
}


@pytest.mark.integration
def test_exporter_counts_a_run_on_a_live_fleet(fleet: Fleet, tmp_path: Path) -> None:
    log = (tmp_path / "metrics.err").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskexec.cli", "metrics", "--port", "0", "--address", "127.0.0.1"],
        env=fleet.env,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
        cwd=ROOT,
    )
    log.close()
    try:
        url = read_line(proc, timeout=30).rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url

        def scrape() -> Samples:
            with urllib.request.urlopen(url, timeout=10) as response:
                return samples(response.read().decode())

        settings = fleet.settings()
        assert isinstance(settings, Settings)
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        with redis.Redis.from_url(fleet.env["TASKEXEC_BROKER_URL"]) as r:

            def subscribed() -> bool:
                # The rate limiter's waits arrive as run events with status "throttled":
                # one proves the subscription is live before the run starts.
                r.publish(channel(probe), json.dumps(event(probe, "t", "throttled")))
                return value(scrape(), "taskexec_throttled_total") >= 1

            wait_for(subscribed, timeout=30, interval=0.2, what="the exporter's run-event subscription")
        wait_for(
            lambda: value(scrape(), "taskexec_workers_online") >= 2,
            timeout=30,
            what="worker heartbeats at the exporter",
        )

        with Client(settings) as client:
            result = client.submit(parse_plan(PLAN)).wait(timeout=60)
        assert result.status is RunStatus.SUCCEEDED, result
        n = result.statistics.total  # 6 tasks: prepare, score[0..2], flaky, report
        ex = {"task": "taskexec.execute", "queue": "executor"}

        def counted() -> bool:
            found = scrape()
            return (
                value(found, "taskexec_celery_tasks_total", state="succeeded", **ex) >= n
                and value(found, "taskexec_run_duration_seconds_count", status="succeeded") >= 1
            )

        wait_for(counted, timeout=30, what="the run in the metrics")
        found = scrape()
        assert value(found, "taskexec_celery_tasks_total", state="started", **ex) >= n + 1
        assert value(found, "taskexec_celery_tasks_total", state="retried", **ex) >= 1
        assert value(found, "taskexec_task_retries_total", **ex) >= 1
        assert value(found, "taskexec_task_runtime_seconds_count", **ex) >= n
        assert value(found, "taskexec_task_wait_seconds_count", **ex) >= n
        validator = {"task": "taskexec.validate", "queue": "validator"}
        assert value(found, "taskexec_celery_tasks_total", state="succeeded", **validator) >= 3
        assert value(found, "taskexec_task_transitions_total", status="validating") >= 3
        assert value(found, "taskexec_task_transitions_total", status="retrying") >= 1
        assert value(found, "taskexec_task_transitions_total", status="succeeded") >= n
        assert value(found, "taskexec_runs_total", status="succeeded") >= 1
        assert value(found, "taskexec_stage_gap_seconds_count") >= 2, "three stages, two gaps"
        duration = value(found, "taskexec_run_duration_seconds_sum", status="succeeded")
        assert duration >= (result.statistics.duration_seconds or 0)
        for queue in QUEUES:
            assert ("taskexec_queue_length", frozenset({("queue", queue)})) in found
        assert not any(name.endswith("_created") for name, _ in found), "no *_created series"

        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, (tmp_path / "metrics.err").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
