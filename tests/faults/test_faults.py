"""The fault suite: one fault each, real processes and real signals, one invariant.

Every case ends with :func:`invariant`, which counts what the promise is about:

* the run is terminal with the expected status, and its status never left a terminal state
  (read from ``execution_logs``: no transition after the first end);
* every task has exactly one terminal transition in ``execution_logs``;
* **real executions** (the ``ledger`` handler notes each start and end in a file): at most
  one per (task, attempt); no more attempts than ``max_attempts``; as many as the store
  counted; no two executions of one task overlap in time (a frozen worker's is the one
  exception a process cannot prevent: its writes are refused and its side effect deduped);
* the side effect (a file created exclusively, named by the task's key) exists once per
  succeeded task.

Cases that nothing should make run twice also assert each handler ran exactly once.
``docs/reliability.md`` lists the cases and their measured outcomes.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import pytest
from kombu import Exchange, Producer

from taskexec import RunStatus, TaskStatus, parse_plan
from tests.faults.conftest import World, free_port, logs_of, wait_until
from tests.faults.promise import client_of, invariant, ledger_task, sql, submit, wait_end, worker_running

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

# ---------------------------------------------------------------- workers dying


@pytest.mark.parametrize("execution", ["stages", "dag"])
def test_sigkill_of_a_pool_process_mid_task(world: World, execution: str) -> None:
    world.fleet.start_many(("executor,validator", 2, "w1"))
    client, run_id = submit(world, {"tasks": [ledger_task(world)]}, execution)
    wait_until(world.started, 30, "the task to start")
    [(_, pid, _, _)] = world.started()
    os.kill(pid, signal.SIGKILL)
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.SUCCEEDED)
    [task] = result.tasks
    assert task.attempts == 2, "the redelivered message took the task over as attempt 2"
    client.close()


def test_sigkill_of_a_whole_worker_then_a_new_one(world: World) -> None:
    world.fleet.start_many(("executor", 1, "w1"), ("validator", 1, "v1"))
    client, run_id = submit(world, {"tasks": [ledger_task(world)]})
    wait_until(world.started, 30, "the task to start")
    [(_, pid, _, _)] = world.started()
    victim = worker_running(world, pid)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    world.fleet.procs.remove(victim)
    world.fleet.start("executor", 1, "w2")
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.SUCCEEDED)
    assert result.tasks[0].attempts == 2
    client.close()


@pytest.mark.parametrize("execution", ["stages", "dag"])
def test_a_poison_message_ends_error_e011_without_a_loop(world: World, execution: str) -> None:
    world.fleet.start_many(("executor,validator", 2, "w1"))
    task = {
        "id": "poison",
        "handler": "python:tests.handlers:suicide",
        "retry": {"max_attempts": 2},
        "params": {"starts": str(world.starts)},
    }
    client, run_id = submit(
        world, {"tasks": [task, {"id": "after", "handler": "stub", "depends_on": ["poison"]}]}, execution
    )
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.FAILED)
    poison = next(t for t in result.tasks if t.id == "poison")
    assert (poison.status, poison.error_code, poison.attempts) == (TaskStatus.ERROR, "E011", 2)
    assert next(t for t in result.tasks if t.id == "after").status is TaskStatus.SKIPPED
    tries = len(world.started())
    assert tries == 2
    time.sleep(4)  # two lease periods and a few reconciler rounds: nothing may start again
    assert len(world.started()) == tries
    client.close()


def test_sigterm_mid_task_finishes_the_task(world: World) -> None:
    world.fleet.start_many(("executor", 1, "w1"), ("executor,validator", 1, "w2"))
    client, run_id = submit(world, {"tasks": [ledger_task(world, delay=2)]})
    wait_until(world.started, 30, "the task to start")
    [(_, pid, _, _)] = world.started()
    victim = worker_running(world, pid)
    os.kill(victim.pid, signal.SIGTERM)  # warm shutdown: the task at hand finishes first
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.SUCCEEDED)
    assert victim.wait(timeout=30) == 0
    client.close()


def test_crash_after_the_commit_before_the_ack(world: World) -> None:
    world.fleet.start_many(("executor,validator", 1, "w1"))
    armed = world.dir / "crash-armed"
    client, run_id = submit(
        world,
        {
            "tasks": [
                ledger_task(world, delay=0.2, crash_after_commit=str(armed)),
                {"id": "next", "handler": "stub", "depends_on": ["work"]},
            ]
        },
    )
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.SUCCEEDED)
    assert (world.dir / "crash-fired").exists(), "the fault point fired"
    work = next(t for t in result.tasks if t.id == "work")
    assert work.attempts == 1, "the redelivered copy found the task done and did nothing"
    runs = sql(world, "SELECT count(*) FROM execution_logs WHERE run_id = :r AND task_id = 'work' "
               "AND to_status = 'running'", r=run_id)  # fmt: skip
    assert runs[0][0] == 1
    client.close()


def test_a_task_running_past_the_visibility_timeout_runs_once(world: World) -> None:
    world.fleet.start_many(("executor", 1, "w1"), ("executor,validator", 1, "w2"))
    spans = world.dir / "spans.txt"
    task = {"id": "long", "handler": "python:tests.handlers:overstay", "timeout": 5,
            "params": {"file": str(spans), "seconds": 13}}  # fmt: skip
    client, run_id = submit(world, {"tasks": [task]})
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.SUCCEEDED)
    lines = spans.read_text().splitlines()
    assert len(lines) == 1, f"executed {len(lines)} times: {lines}"
    assert result.tasks[0].attempts == 1
    client.close()


def test_a_chord_body_delivered_twice_dispatches_the_next_stage_once(world: World) -> None:
    world.fleet.start_many(("executor,validator", 2, "w1"))
    first = ledger_task(world, tid="a", delay=0.1)
    second = [ledger_task(world, tid=f"b{i}", delay=1.5) for i in range(3)]
    for t in second:
        t["depends_on"] = ["a"]
    client, run_id = submit(world, {"tasks": [first, *second]})
    wait_until(lambda: any(task.startswith("b") for *_, task in world.started()), 30, "stage 1 running")
    for _ in range(2):  # the body of stage 0, again, twice
        client.app.send_task("taskexec.advance", args=(run_id, 1), queue="control")
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.SUCCEEDED)
    query = (
        "SELECT task_id, count(*) FROM execution_logs "
        "WHERE run_id = :r AND to_status = 'queued' AND task_id IS NOT NULL GROUP BY 1"
    )
    queued = sql(world, query, r=run_id)
    assert dict(queued) == {"a": 1, "b0": 1, "b1": 1, "b2": 1}
    assert [attempt for *_, attempt, task in world.started() if task.startswith("b")] == [1, 1, 1]
    client.close()


# ---------------------------------------------------------------- services failing


def test_redis_restarted_empty_mid_run(world: World) -> None:
    world.fleet.start_many(("executor,validator", 2, "w1"))
    stage0 = ledger_task(world, tid="a", delay=0.1)
    stage1 = [ledger_task(world, tid=f"b{i}", delay=2) for i in range(4)]
    for t in stage1:
        t["depends_on"] = ["a"]
    client, run_id = submit(
        world, {"tasks": [stage0, *stage1, {"id": "z", "handler": "stub", "depends_on": ["b0"]}]}
    )
    wait_until(lambda: any(task.startswith("b") for *_, task in world.started()), 30, "stage 1 running")
    world.redis.restart_empty()  # every queued message, chord counter and result is gone
    client.close()
    client = client_of(world)
    result = wait_end(client, run_id, timeout=120)  # the reconciler sees the new Redis and resumes
    invariant(world, result, RunStatus.SUCCEEDED)
    client.close()


def test_redis_stalled_while_a_stage_ends(world: World) -> None:
    world.fleet.start_many(("executor,validator", 2, "w1"))
    stage0 = [ledger_task(world, tid=f"a{i}", delay=1) for i in range(3)]
    client, run_id = submit(
        world, {"tasks": [*stage0, {"id": "z", "handler": "stub", "depends_on": ["a0", "a1", "a2"]}]}
    )
    wait_until(lambda: len(world.started()) == 3, 30, "stage 0 running")
    staller = world.redis.client()
    try:
        staller.execute_command("DEBUG", "SLEEP", "3")  # the stage's tasks end meanwhile
    finally:
        staller.close()
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.SUCCEEDED)
    client.close()


def test_postgresql_stopped_five_seconds_mid_run(world: World) -> None:
    world.fleet.start_many(("executor,validator", 2, "w1"))
    tasks = [ledger_task(world, tid=f"t{i}", delay=1.5) for i in range(4)]
    tasks.append({"id": "z", "handler": "stub", "depends_on": [t["id"] for t in tasks]})
    client, run_id = submit(world, {"tasks": tasks})
    wait_until(lambda: len(world.started()) >= 2, 30, "tasks running")
    world.pg.stop()
    time.sleep(5)  # the outage itself: workers finish their handlers and wait for the store
    world.pg.start()
    result = wait_end(client, run_id, timeout=120)
    invariant(world, result, RunStatus.SUCCEEDED)
    rows = sql(world, "SELECT count(*) FROM executions WHERE run_id = :r", r=run_id)
    assert rows[0][0] == 5, "one executions row per task, no duplicates"
    client.close()


def test_a_frozen_worker_past_its_lease(world: World) -> None:
    world.fleet.start_many(("executor", 1, "w1"), ("executor,validator", 1, "w2"))
    client, run_id = submit(world, {"tasks": [ledger_task(world, delay=4)]})
    wait_until(world.started, 30, "the task to start")
    [(_, pid, _, _)] = world.started()
    frozen = worker_running(world, pid)
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        # Taken over elsewhere after the lease ran out. The frozen worker thaws while the
        # second attempt runs, within the task's time limit: the worker's timer is frozen
        # too, and past the limit it would stop the thawed attempt before its final write.
        wait_until(lambda: len(world.started()) == 2, 30, "the task to be taken over")
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    result = wait_end(client, run_id)
    assert result.tasks[0].attempts == 2
    wait_until(
        lambda: sum(e.ended is not None for e in world.executions()) == 2, 30, "the frozen attempt to end"
    )
    time.sleep(1)  # let the thawed attempt try its final write
    # The one overlap no process can prevent: the frozen attempt resumed its handler while
    # attempt 2 ran. Its writes were refused, its side effect deduplicated by the task key.
    invariant(world, client.status(run_id), RunStatus.SUCCEEDED, overlap_ok=True)
    assert client.status(run_id).tasks[0].attempts == 2
    client.close()


def test_cancel_while_every_worker_is_stopped(world: World) -> None:
    world.fleet.start_many(("validator", 1, "control-only"))  # consumes control: dispatches the stage
    tasks = [ledger_task(world, tid=f"t{i}", delay=0.5) for i in range(3)]
    client, run_id = submit(world, {"tasks": tasks})
    wait_until(lambda: client.status(run_id).statistics.running == 3, 30, "the stage queued")
    world.fleet.stop()
    world.fleet.procs.clear()
    assert client.cancel(run_id) is RunStatus.CANCELLED
    world.fleet.start_many(("executor,validator", 2, "w1"))
    time.sleep(3)  # the queued messages reach the workers now
    result = client.status(run_id)
    invariant(world, result, RunStatus.CANCELLED)
    assert world.started() == [] and all(t.attempts == 0 for t in result.tasks)
    client.close()


# ---------------------------------------------------------------- security


def test_a_pickle_message_is_rejected_and_nothing_runs(world: World) -> None:
    world.fleet.start_many(("executor,validator", 1, "w1"))
    client, run_id = submit(world, {"tasks": [ledger_task(world, delay=0)]})
    wait_end(client, run_id)
    before = len(world.started())
    with client.app.connection_for_write() as conn:  # the fleet's transport options (key separator)
        producer = Producer(conn, exchange=Exchange("executor", type="direct"), routing_key="executor")
        producer.publish(
            {"args": [run_id, "work"]},
            serializer="pickle",
            headers={"task": "taskexec.execute", "id": "evil", "lang": "py", "argsrepr": "evil"},
        )
    wait_until(lambda: "ContentDisallowed" in logs_of(world) or "disallowed" in logs_of(world).lower(),
               30, "the worker to refuse the message")  # fmt: skip
    assert len(world.started()) == before
    again = wait_end(client, client.submit(parse_plan({"tasks": [{"id": "ok", "handler": "stub"}]})).run_id)
    assert again.status is RunStatus.SUCCEEDED, "the worker survived and works"
    client.close()


def test_a_long_backoff_waits_in_the_store_not_in_a_message(world: World) -> None:
    world.fleet.start_many(("executor,validator", 2, "w1"))
    # 5 s is more than half the visibility timeout (8 s): Redis would hold an ETA message in
    # worker memory and deliver it twice; the store holds the backoff and the reconciler sends it.
    flaky = {"id": "flaky", "handler": "stub", "retry": {"max_attempts": 2, "backoff": 5, "jitter": False},
             "params": {"fail_attempts": 1}}  # fmt: skip
    client, run_id = submit(
        world, {"tasks": [flaky, {"id": "z", "handler": "stub", "depends_on": ["flaky"]}]}
    )
    wait_until(
        lambda: (
            sql(world, "SELECT deferred FROM executions WHERE run_id = :r AND task_id = 'flaky'", r=run_id)
            == [(True,)]
        ),
        30,
        "the backoff stored as deferred",
    )
    result = wait_end(client, run_id)
    invariant(world, result, RunStatus.SUCCEEDED)
    starts = [
        at
        for (at,) in sql(
            world,
            "SELECT at FROM execution_logs WHERE run_id = :r AND task_id = 'flaky' AND to_status = 'running' "
            "ORDER BY id",
            r=run_id,
        )
    ]
    assert len(starts) == 2 and (starts[1] - starts[0]).total_seconds() >= 5, "not before the backoff"
    client.close()


def test_a_canary_secret_reaches_no_message_log_or_row(world: World) -> None:
    canary = world.fleet.env["CANARY_SECRET"]
    world.fleet.start_many(("executor,validator", 1, "w1"))
    flower_port = free_port()
    flower_log = (world.dir / "flower.log").open("wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "taskexec.cli", "flower", "--port", str(flower_port)],
        env={**world.fleet.env, "TASKEXEC_FLOWER_BASIC_AUTH": "ops:fault-suite"},
        stdout=flower_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    flower_log.close()

    def flower_api(path: str) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{flower_port}{path}",
            headers={"Authorization": "Basic " + base64.b64encode(b"ops:fault-suite").decode()},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""

    try:
        _check_no_canary(world, canary, flower_api)
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(timeout=15)


def _check_no_canary(world: World, canary: str, flower_api: Callable[[str], str]) -> None:
    """Run a task holding the canary, then search rows, Redis, logs and Flower for it."""
    # Flower sees tasks through the workers' events: wait until it hears the worker's heartbeat.
    wait_until(lambda: '": true' in flower_api("/api/workers?status=1"), 30, "Flower receiving events")
    echo = (
        "import os, sys; key = os.environ['API_KEY']; print(key); print('fail ' + key, file=sys.stderr); "
        "sys.exit(int(os.environ['TASKEXEC_ATTEMPT'] == '1'))"
    )
    task = {
        "id": "leaky",
        "handler": "shell",
        "retry": {"max_attempts": 2, "backoff": 0.1},
        "params": {"argv": ["python3", "-c", echo], "env": {"API_KEY": {"secret": "CANARY_SECRET"}}},
    }
    by_name = {
        "id": "named",
        "handler": "stub",
        "secret_params": ["token"],
        "params": {"token": "CANARY_SECRET"},
    }
    client, run_id = submit(world, {"tasks": [task, by_name]})
    result = wait_end(client, run_id)
    assert result.status is RunStatus.SUCCEEDED, result.tasks
    leaky = next(t for t in result.tasks if t.id == "leaky")
    assert leaky.output["stdout"].strip() == "***" and leaky.attempts == 2
    # The database: every table, as text.
    for table in ("runs", "executions", "execution_logs", "execution_metrics"):
        dump = json.dumps([list(map(str, row)) for row in sql(world, f"SELECT * FROM {table}")])
        assert canary not in dump, f"the canary is in table {table}"
    # Redis: every key's value.
    r = world.redis.client()
    try:
        for key in r.scan_iter(count=1000):
            assert canary.encode() not in (r.dump(key) or b""), f"the canary is in Redis key {key!r}"
    finally:
        r.close()
    assert canary not in logs_of(world), "the canary is in a worker log"
    assert canary not in json.dumps(result.model_dump(mode="json"))
    # Flower: what it shows of our tasks (from the workers' events).
    wait_until(lambda: "leaky" in flower_api("/api/tasks"), 30, "Flower to list the run's tasks")
    assert canary not in flower_api("/api/tasks"), "the canary is in Flower's API"
    client.close()
