"""Lost or duplicated work: the faults between a commit and a publish, and what restarts cost.

Each case runs on real processes against the suite's private Redis and PostgreSQL, and
ends with :func:`~tests.faults.promise.invariant` (real executions counted per attempt,
no overlap, attempts within budget, one terminal record per task, a run status that
never leaves its end); where nothing interrupted a handler, :func:`ran_once` too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from taskexec import RunStatus, TaskStatus, parse_plan
from taskexec.run.faultpoints import POINTS
from tests.conftest import ROOT
from tests.faults.conftest import PrivatePostgres, PrivateRedis, World, make_world, wait_until
from tests.faults.promise import (
    client_of,
    invariant,
    ledger_task,
    ran_once,
    run_path,
    sql,
    submit,
    wait_end,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def stages(world: World, widths: list[int], delay: float, **params: Any) -> dict[str, Any]:
    """A plan of ledger tasks in stages of the given widths, each stage a group after the last."""
    groups: list[dict[str, Any]] = []
    for k, width in enumerate(widths):
        group: dict[str, Any] = {
            "id": f"s{k}",
            "tasks": [ledger_task(world, tid=f"t{k}_{i}", delay=delay, **params) for i in range(width)],
        }
        if k:
            group["depends_on"] = [f"s{k - 1}"]
        groups.append(group)
    return {"tasks": groups}


def resent(world: World, run_id: str) -> int:
    """How many times the run's in-flight tasks were sent again wholesale (resume, data loss)."""
    rows = sql(world, "SELECT count(*) FROM execution_logs WHERE run_id = :r AND event = 'resume'", r=run_id)
    return int(rows[0][0])


def cli(world: World, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskexec.cli", *args],
        env={**world.fleet.env, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


# ---------------------------------------------------------------- Redis restarts


@pytest.mark.parametrize("down", [0.0, 4.0], ids=["restarted", "down-4s"])
def test_redis_restarted_empty_while_a_large_stage_is_published(world: World, down: float) -> None:
    """Issue 13, case 1: the chord body failed mid-publish, the error callback ended the run
    ``failed`` and cancelled 24 of 50 tasks that never ran. Now the run goes on.

    Redis dies while the 100th message of a 300-task stage is being sent: restarted at once
    (the rest of the chord goes to an empty Redis), or down long enough for the publish to
    fail (Celery gives up after its publish retries), then back empty.
    """
    world.fleet.start_many(("executor,validator", 2, "w1"), ("executor", 2, "w2"))
    client, run_id = submit(world, stages(world, [1, 300, 1], delay=0.02))
    wait_until(world.started, 30, "stage 0 running")
    (world.dir / "stall-publish").write_text("100 3")  # the 100th message of stage 1 waits 3 s
    wait_until((world.dir / "stall-publish.fired").exists, 30, "the publication half done")
    world.redis.stop()  # every message, chord counter and identity key is gone
    time.sleep(down)
    world.redis.start()
    result = wait_end(client, run_id, timeout=150)
    invariant(world, result, RunStatus.SUCCEEDED)
    ran_once(world, result)
    client.close()


def test_redis_restarted_with_its_data_mid_run(aof_world: World) -> None:
    """Issue 13, case 2: a Redis restart that kept every key (AOF) made the reconciler resume
    the run and all 7 in-flight tasks run twice. Now nothing runs twice, nothing is re-sent."""
    world = aof_world
    world.fleet.start_many(("executor,validator", 2, "w1"), ("executor", 2, "w2"))
    client, run_id = submit(world, stages(world, [1, 6, 1], delay=2.0))
    wait_until(lambda: sum(t.startswith("t1_") for *_, t in world.started()) >= 4, 30, "stage 1 running")
    world.redis.restart()  # kill -9, then start on the same append-only file
    result = wait_end(client, run_id, timeout=120)
    invariant(world, result, RunStatus.SUCCEEDED)
    ran_once(world, result)
    assert resent(world, run_id) == 0, "the broker kept its data: nothing was sent again wholesale"
    client.close()


# ---------------------------------------------------------------- resume


def test_resume_while_tasks_run_under_live_leases(world: World) -> None:
    """Issue 13, case 2: ``resume`` mid-run re-queued 8 running tasks of ``max_attempts: 1``,
    which all ran twice. Now the copies wait for the live leases; each handler runs once."""
    world.fleet.start_many(("executor,validator", 4, "w1"), ("executor", 4, "w2"))
    tasks = [ledger_task(world, tid=f"t{i}", delay=4.0) for i in range(8)]
    for t in tasks:
        t["retry"] = {"max_attempts": 1}
    client, run_id = submit(world, {"tasks": tasks})
    wait_until(lambda: len(world.started()) == 8, 30, "all 8 running")
    assert client.resume(run_id) == 8
    result = wait_end(client, run_id, timeout=90)
    invariant(world, result, RunStatus.SUCCEEDED)
    ran_once(world, result)
    assert run_path(world, run_id) == ["queued", "running", "succeeded"], "no false end on the way"
    client.close()


# ---------------------------------------------------------------- delayed messages


def test_a_worker_holding_delayed_messages_is_killed(
    private_redis: PrivateRedis, private_pg: PrivatePostgres
) -> None:
    """Issue 13, case 3: kill -9 of a worker holding throttled and backoff messages in its
    memory left 21 of 24 tasks ``queued`` for the visibility timeout (1 h). The due times
    are in the store: the reconciler sends them again long before the visibility timeout."""
    visibility = 120  # kombu would restore the held messages only after this
    with make_world(private_redis, private_pg, TASKEXEC_VISIBILITY_TIMEOUT=str(visibility)) as world:
        world.fleet.start_many(("executor", 2, "e1"), ("validator", 1, "v1"))
        paced = [ledger_task(world, tid=f"p{i}", delay=0.1) for i in range(8)]
        for t in paced:
            t["rate_limit"] = "slow"
        flaky = ledger_task(world, tid="flaky", delay=0.1, fail_attempts=1)
        flaky["retry"] = {"max_attempts": 2, "backoff": 6, "jitter": False}  # a countdown in memory
        doc = {"rate_limits": {"slow": {"per_minute": 40, "burst": 1}}, "tasks": [*paced, flaky]}
        client, run_id = submit(world, doc)
        wait_until(lambda: any(t == "flaky" for *_, t in world.started()), 30, "the flaky task's first try")
        time.sleep(1.0)  # its retry and the paced tasks now wait in e1's memory
        [e1] = [p for p in world.fleet.procs if world.fleet.names[p.pid] == "e1"]
        world.fleet.kill(e1)
        e1.wait(timeout=10)
        world.fleet.procs.remove(e1)
        killed_at = time.monotonic()
        world.fleet.start("executor", 2, "e2")
        result = wait_end(client, run_id, timeout=90)
        took = time.monotonic() - killed_at
        print(f"delayed messages of a killed worker: the run ended {took:.1f} s after the kill")
        invariant(world, result, RunStatus.SUCCEEDED)
        assert took < visibility / 2, f"{took:.1f} s: the held messages came back by the visibility timeout"
        client.close()


# ---------------------------------------------------------------- fault points


def test_the_control_worker_killed_between_commit_and_publish_of_a_large_stage(world: World) -> None:
    """Issue 13, case 3: kill -9 of the control worker after the commit that queued a
    3,000-task stage and before its publication left every row ``queued`` with no message.
    The rows are an outbox: the reconciler sends them after the grace period."""
    world.fleet.start_many(("executor,validator", 2, "w1"), ("executor", 2, "w2"))
    plan = stages(world, [1, 600], delay=0.0)
    # Stage 0's task lasts long enough for the point to be armed before stage 1's dispatch
    # (a stage 0 that ended at once was dispatched past the point before it was armed).
    plan["tasks"][0]["tasks"] = [ledger_task(world, tid="t0_0", delay=2.0)]
    client, run_id = submit(world, plan)
    wait_until(world.started, 30, "stage 0 running")
    world.arm("dispatch.committed")
    result = wait_end(client, run_id, timeout=180)
    assert world.fired("dispatch.committed"), "the fault point fired"
    invariant(world, result, RunStatus.SUCCEEDED)
    ran_once(world, result)
    client.close()


def _gate(world: World) -> dict[str, Any]:
    return {
        "tasks": [
            {"id": "gate", "handler": "approval", "params": {"message": "go?"}},
            {**ledger_task(world, tid="after", delay=0.2), "depends_on": ["gate"]},
        ]
    }


def _validated(world: World) -> dict[str, Any]:
    task = ledger_task(world, tid="checked", delay=0.2)
    task["validate"] = [{"path": "attempt", "op": ">=", "value": 2}]  # the first attempt fails its criteria
    return {"tasks": [task, {**ledger_task(world, tid="next", delay=0.1), "depends_on": ["checked"]}]}


def _two_stages(world: World) -> dict[str, Any]:
    return stages(world, [2, 3], delay=0.5)


def _slow_stages(world: World) -> dict[str, Any]:  # still running when a CLI process has started
    return stages(world, [2, 3], delay=4.0)


def _flaky(world: World, backoff: float = 1.0) -> dict[str, Any]:
    task = ledger_task(world, tid="flaky", delay=0.2, fail_attempts=1)
    task["retry"] = {"max_attempts": 2, "backoff": backoff, "jitter": False}
    return {"tasks": [task, {**ledger_task(world, tid="next", delay=0.1), "depends_on": ["flaky"]}]}


#: point -> the plan that passes through it, whether every handler still runs exactly once.
CASES: dict[str, tuple[Any, bool]] = {
    "submit.committed": (_two_stages, True),
    "dispatch.committed": (_two_stages, True),
    "dispatch.published": (_two_stages, True),
    "execute.claimed": (_two_stages, False),  # the killed attempt never ran; the next one does
    "execute.delayed": (_flaky, False),
    "execute.settled": (_two_stages, True),
    "validate.delayed": (_validated, False),
    "decide.committed": (_gate, True),
    "resume.committed": (_slow_stages, True),
    # A deferred backoff (longer than half the visibility timeout) is sent by the reconciler.
    "reconcile.marked": (lambda w: _flaky(w, backoff=5.0), False),
}


def test_every_fault_point_is_covered() -> None:
    assert set(CASES) == set(POINTS)


@pytest.mark.parametrize("execution", ["stages", "dag"])
@pytest.mark.parametrize("point", sorted(CASES))
def test_a_process_killed_between_a_commit_and_its_publish(world: World, point: str, execution: str) -> None:
    """SIGKILL of the process at each point between a commit and a publish loses nothing,
    runs nothing twice: the outbox, the due times and the reconciler carry the run on."""
    plan, once = CASES[point]
    world.fleet.start_many(("executor,validator", 2, "w1"), ("executor", 1, "w2"))
    client = client_of(world)
    doc = plan(world)
    armed = {"TASKEXEC_FAULTPOINTS": str(world.faultpoints)}
    if point == "submit.committed":  # the producer dies: a CLI process
        world.arm(point)
        plan_file = world.dir / "plan.json"
        plan_file.write_text(json.dumps(doc))
        p = cli(world, "submit", str(plan_file), "--execution", execution, **armed)
        assert p.returncode == -9, (p.returncode, p.stderr)
        [(run_id,)] = sql(world, "SELECT run_id FROM runs ORDER BY submitted_at DESC LIMIT 1")
    else:
        run_id = client.submit(parse_plan(doc), execution=execution).run_id
        if point == "decide.committed":
            wait_until(lambda: client.status(run_id).statistics.waiting_approval == 1, 30, "the gate waiting")
            world.arm(point)
            p = cli(world, "approve", run_id, "gate", **armed)
            assert p.returncode == -9, (p.returncode, p.stderr)
        elif point == "resume.committed":
            wait_until(lambda: len(world.started()) >= 1, 30, "stage 0 running")
            world.arm(point)
            p = cli(world, "resume", run_id, **armed)
            assert p.returncode == -9, (p.returncode, p.stderr)
        else:
            world.arm(point)
    result = wait_end(client, run_id, timeout=90)
    assert world.fired(point), f"{point} never fired"
    invariant(world, result, RunStatus.SUCCEEDED)
    if once:
        ran_once(world, result)
    client.close()


# ---------------------------------------------------------------- PostgreSQL outages


@pytest.mark.parametrize(
    ("outage", "settings"),
    [
        pytest.param(6.0, {}, id="longer-than-a-task-timeout"),
        pytest.param(10.0, {"TASKEXEC_DB_RETRY_SECONDS": "2"}, id="longer-than-the-retry-window"),
    ],
)
def test_postgresql_down_long(
    private_redis: PrivateRedis, private_pg: PrivatePostgres, outage: float, settings: dict[str, str]
) -> None:
    """Issue 13, case 4: a 20 s outage with a 10 s task timeout ended in
    ``SoftTimeLimitExceeded`` outside the handler and a stuck run; a 45 s one (beyond the
    retry window) also ran 8 finished handlers again. Store waits are outside the time
    limit, a finished outcome is held until the store takes it, and nothing runs twice."""
    with make_world(private_redis, private_pg, **settings) as world:
        world.fleet.start_many(("executor,validator", 2, "w1"), ("executor", 2, "w2"))
        doc = stages(world, [4, 4], delay=1.5)
        for group in doc["tasks"]:
            for t in group["tasks"]:
                t["timeout"] = 3  # shorter than the outage
        client, run_id = submit(world, doc)
        wait_until(lambda: len(world.started()) >= 3, 30, "stage 0 running")
        world.pg.stop()
        time.sleep(outage)
        world.pg.start()
        result = wait_end(client, run_id, timeout=150)
        invariant(world, result, RunStatus.SUCCEEDED)
        ran_once(world, result)
        assert not any(t.status is TaskStatus.TIMED_OUT for t in result.tasks)
        client.close()


# ---------------------------------------------------------------- what a run leaves in Redis


@pytest.mark.timeout(900)
def test_20000_tasks_leave_no_results_in_redis(world: World) -> None:
    """Issue 13, case 10: 20,000 tasks left 20,012 result keys (24 MB) in Redis for 7 days.
    No task result is kept; a settled chord's keys are deleted with it, but for Celery's
    small dispatch-claim key, which expires minutes later."""
    r = world.redis.client()
    try:
        r.flushall()
        world.fleet.start_many(("executor,validator", 2, "w1"))
        before = r.info("memory")["used_memory_dataset"]
        client = client_of(world)
        stub = {"id": "many", "handler": "stub", "matrix": {"strategy": "cartesian", "max_cases": 20_000}}
        stub["matrix"]["params"] = {"i": list(range(200)), "j": list(range(100))}
        doc = {"tasks": [stub, {"id": "after", "handler": "stub", "depends_on": ["many"]}]}
        run_id = client.submit(parse_plan(doc)).run_id
        result = wait_end(client, run_id, timeout=800)
        assert result.status is RunStatus.SUCCEEDED and len(result.tasks) == 20_001
        time.sleep(2)  # the last chord's body and its cleanup
        keys = {k.decode(): r.ttl(k) for k in r.scan_iter(count=1000)}
        memory = r.info("memory")
        sizes = {k: r.memory_usage(k) for k in keys}
        print(
            f"after {len(result.tasks)} tasks: {len(keys)} keys, dataset {memory['used_memory_dataset']} B "
            f"(before the run {before} B), used_memory {memory['used_memory']} B; "
            f"the keys hold {sum(size or 0 for size in sizes.values())} B, the largest: "
            f"{sorted(sizes.items(), key=lambda kv: -(kv[1] or 0))[:5]}"
        )
        assert not [k for k in keys if k.startswith("celery-task-meta-")], "a task result was kept"
        lasting = {
            k: ttl for k, ttl in keys.items() if k.startswith("celery-taskset-meta-") and not 0 < ttl <= 600
        }
        assert not lasting, f"chord keys that outlive the run: {lasting}"
        assert len(keys) < 50, sorted(keys)
        left = sum(size or 0 for size in sizes.values())
        assert left < 64 * 1024, f"the keys left hold {left} bytes"
        client.close()
    finally:
        r.close()
