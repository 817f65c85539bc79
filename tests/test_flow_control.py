"""Fleet-wide rate limits, priorities and per-run concurrency, on real worker processes."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from taskexec import Client, RunResult, RunStatus, TaskStatus, parse_plan
from taskexec.models import RateLimit
from taskexec.run.ratelimit import RateLimiter, bucket_key
from taskexec.settings import Settings
from tests.conftest import Fleet, make_fleet_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def client_for(fleet: Fleet) -> Client:
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    return Client(settings)


@pytest.fixture(scope="module")
def four(redis_db: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Four executor worker processes (separate workers, one process each) and a validator,
    shared by the tests of this module (each test has its own runs and limit names)."""
    tmp = tmp_path_factory.mktemp("four")
    env = make_fleet_env(redis_db, pg_url, tmp / "home")
    # Short leases, and a waiting task asks again every second: a few seconds show both.
    f = Fleet({**env, "TASKEXEC_LEASE_SECONDS": "3", "TASKEXEC_MAX_THROTTLE_WAIT": "1"}, tmp)
    try:
        f.start_many(*((("executor", 1, f"exec{i}")) for i in range(4)), ("validator", 1, "val"))
        yield f
    finally:
        f.stop()


def starts(path: Path) -> list[float]:
    return sorted(float(line.split()[0]) for line in path.read_text().splitlines())


def assert_within_limit(times: list[float], per_second: float, burst: int, slack: float = 0.05) -> None:
    """No window [t_i, t_j] holds more starts than burst + rate x (its length + slack).

    The default slack: a clock read a moment after the token's time (Redis TIME).
    """
    for i in range(len(times)):
        for j in range(i, len(times)):
            allowed = burst + per_second * (times[j] - times[i] + slack)
            assert j - i + 1 <= allowed, f"{j - i + 1} starts in {times[j] - times[i]:.2f} s"


def assert_starts_within_limit(
    results: list[RunResult], log: Path, per_second: float, burst: int, prefix: str = ""
) -> None:
    """The tasks' starts hold the limit: as recorded, and as their handlers saw them.

    A task's recorded start is read as it claims its attempt, right after its token. Its
    handler starts after the claim's transaction, which takes longer in a fresh worker
    process (a first connection's catalogue, first statements): the handlers' own times
    hold the limit up to how much that work varied, measured here task by task.
    """
    tasks = [t for r in results for t in r.tasks if t.id.startswith(prefix)]
    recorded = {t.id: t.started_at.timestamp() for t in tasks if t.started_at}
    lines = (line.split() for line in log.read_text().splitlines())
    seen = {task: float(at) for at, task, _ in lines if task.startswith(prefix)}
    assert seen.keys() == recorded.keys() and seen
    assert_within_limit(sorted(recorded.values()), per_second, burst)
    lags = [seen[k] - recorded[k] for k in recorded]
    assert min(lags) >= 0
    assert_within_limit(sorted(seen.values()), per_second, burst, slack=0.05 + max(lags) - min(lags))


def plan_of(
    n: int, limit: dict[str, Any], file: Path, prefix: str = "t", name: str = "api", **extra: Any
) -> dict[str, Any]:
    return {
        "id": prefix,
        "rate_limits": {name: limit},
        "tasks": [
            {
                "id": f"{prefix}{i}",
                "handler": "python:tests.handlers:record_start",
                "rate_limit": name,
                "params": {"file": str(file)},
                **extra,
            }
            for i in range(n)
        ],
    }


@pytest.mark.parametrize("execution", ["stages", "dag"])
def test_a_limit_holds_across_four_workers_and_is_used_to_at_least_90_percent(
    four: Fleet, tmp_path: Path, execution: str
) -> None:
    log = tmp_path / "starts.txt"
    with client_for(four) as client:
        plan = parse_plan(plan_of(40, {"per_minute": 60, "burst": 5}, log))
        r = client.submit(plan, execution=execution).wait(timeout=120)
    assert r.status is RunStatus.SUCCEEDED, r.statistics
    times = starts(log)
    assert len(times) == 40
    assert_starts_within_limit([r], log, 1.0, 5)
    sustained = (len(times) - 5) / (times[-1] - times[0])  # the burst is free, the rest is the rate
    assert sustained >= 0.9, f"{sustained:.2f} starts/s against a limit of 1/s"
    assert r.statistics.throttled >= 35 - 5  # nearly every task past the burst waited
    assert r.statistics.retries == 0  # waits are not attempts
    assert {t.attempts for t in r.tasks} == {1}
    assert len({line.split()[2] for line in log.read_text().splitlines()}) >= 1


def test_a_global_limit_is_shared_by_runs_and_run_limits_are_not(four: Fleet, tmp_path: Path) -> None:
    shared, own = tmp_path / "shared.txt", tmp_path / "own.txt"
    limit = {"per_minute": 120, "burst": 2}
    with client_for(four) as client:
        handles = [
            client.submit(
                parse_plan(plan_of(8, {**limit, "scope": "global"}, shared, prefix=p, name="shared"))
            )
            for p in ("a", "b")
        ]
        results = [h.wait(timeout=120) for h in handles]
        assert all(r.status is RunStatus.SUCCEEDED for r in results)
        assert_starts_within_limit(results, shared, 2.0, 2)  # 16 starts of two runs under one limit

        handles = [client.submit(parse_plan(plan_of(8, limit, own, prefix=p))) for p in ("c", "d")]
        results = [h.wait(timeout=120) for h in handles]
    assert all(r.status is RunStatus.SUCCEEDED for r in results)
    for prefix in ("c", "d"):
        assert_starts_within_limit(results, own, 2.0, 2, prefix=prefix)
    # Together the two runs went faster than one limit allows: each had its own bucket.
    with pytest.raises(AssertionError):
        assert_starts_within_limit(results, own, 2.0, 2)


def test_a_handler_is_imported_before_its_task_asks_for_a_token(four: Fleet) -> None:
    """A module slow to import (0.5 s) is imported before the token, not between it and the handler."""
    doc = {
        "id": "imports",
        "rate_limits": {"api": {"per_minute": 6000, "burst": 8}},
        "tasks": [
            {"id": f"i{i}", "handler": "python:tests.slow_import:imported_at", "rate_limit": "api"}
            for i in range(8)
        ],
    }
    with client_for(four) as client:
        result = client.submit(parse_plan(doc)).wait(timeout=120)
    assert result.status is RunStatus.SUCCEEDED
    for task in result.tasks:
        assert task.started_at is not None
        assert task.output["imported_at"] < task.started_at.timestamp() <= task.output["started_at"]


def test_a_throttled_task_keeps_its_only_attempt(four: Fleet, tmp_path: Path) -> None:
    log = tmp_path / "starts.txt"
    limit = {"per_minute": 60, "burst": 10, "scope": "global"}
    doc = plan_of(1, limit, log, name="starved", retry={"max_attempts": 1})
    starved = RateLimit(**limit)
    key = bucket_key("starved", starved, run_id="-")
    r = redis.Redis.from_url(four.env["TASKEXEC_BROKER_URL"])
    # Another consumer of the same limit (another fleet with the same API key) takes the
    # burst and asks for as much again: the task queues behind 10 s of tokens promised to
    # it, and asks again every second (TASKEXEC_MAX_THROTTLE_WAIT) until its turn.
    other = RateLimiter(r)
    assert other.acquire(key, starved, holder="other/0", n=10).granted
    promised = other.acquire(key, starved, holder="other/1", n=10)
    assert not promised.granted and promised.wait > 9
    turn = time.monotonic() + promised.wait
    try:
        with client_for(four) as client:
            handle = client.submit(parse_plan(doc))
            wait_for(lambda: handle.status().tasks[0].throttled >= 5, timeout=60, what="5 waits for a token")
            [seen] = client.flow(handle.run_id).limits
            assert (seen.name, seen.scope, seen.waiting) == ("starved", "global", 2)  # other/1, the task
            # Tokens still owed, as refilled since: the other's 10 before its turn, the task's 1.
            assert seen.tokens < 1 and 1 < seen.reserved < 11
            assert handle.status().tasks[0].status is TaskStatus.QUEUED
            time.sleep(max(0.0, turn - time.monotonic()))
            assert other.acquire(key, starved, holder="other/1", n=10).granted  # the other's turn
            result = handle.wait(timeout=60)
    finally:
        r.close()
    [task] = result.tasks
    assert result.status is RunStatus.SUCCEEDED
    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1)
    assert task.throttled >= 5 and result.statistics.throttled == task.throttled


def test_a_cancelled_run_gives_back_the_tokens_reserved_for_its_tasks(four: Fleet, tmp_path: Path) -> None:
    limit = {"per_minute": 60, "burst": 1, "scope": "global"}
    doc = plan_of(10, limit, tmp_path / "starts.txt", prefix="c", name="given-back")
    with client_for(four) as client:
        handle = client.submit(parse_plan(doc))
        wait_for(lambda: client.flow(handle.run_id).limits[0].waiting >= 5, what="tasks waiting in line")
        handle.cancel()
        assert handle.wait(timeout=30).status is RunStatus.CANCELLED
        [after] = client.flow(handle.run_id).limits
    # Nine tasks waited for tokens up to 9 s away: their tokens are back for other runs.
    assert (after.waiting, after.reserved) == (0, 0.0)
    assert after.tokens >= 0


def test_a_high_priority_task_overtakes_a_backlog(fleet_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "starts.txt"
    f = Fleet(fleet_env, tmp_path)
    try:
        f.start("executor,validator", concurrency=1, name="single")
        handler = {
            "handler": "python:tests.handlers:record_start",
            "params": {"file": str(log), "delay": 0.02},
        }
        backlog = {"id": "low", "defaults": {"priority": 0},
                   "tasks": [{"id": f"low{i}", **handler} for i in range(200)]}  # fmt: skip
        urgent = {"id": "high", "defaults": {"priority": 9}, "tasks": [{"id": "urgent", **handler}]}
        with client_for(f) as client:
            low = client.submit(parse_plan(backlog))
            wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, what="backlog running")
            high = client.submit(parse_plan(urgent))
            assert high.wait(timeout=120).status is RunStatus.SUCCEEDED
            assert low.wait(timeout=120).status is RunStatus.SUCCEEDED
    finally:
        f.stop()
    order = [
        line.split()[1] for line in sorted(log.read_text().splitlines(), key=lambda x: float(x.split()[0]))
    ]
    after = len(order) - 1 - order.index("urgent")
    assert after >= 150, f"the priority-9 task started before only {after} of 200 priority-0 tasks"


def max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("execution", ["stages", "dag"])
def test_a_concurrency_cap_holds_across_workers(four: Fleet, tmp_path: Path, execution: str) -> None:
    log = tmp_path / "spans.txt"
    span = {"file": str(log), "delay": 0.5}
    doc = {
        "concurrency": 3,
        "tasks": [
            {
                "id": f"t{i}",
                "handler": "python:tests.handlers:record_span",
                "params": span,
            }
            for i in range(12)
        ],
    }
    with client_for(four) as client:
        result = client.submit(parse_plan(doc), execution=execution).wait(timeout=120)
    assert result.status is RunStatus.SUCCEEDED
    spans = [(float(a), float(b)) for a, b, *_ in (line.split() for line in log.read_text().splitlines())]
    assert len(spans) == 12
    assert max_overlap(spans) == 3  # the cap, reached (four workers could have run four)
    assert result.statistics.throttled > 0


def test_a_killed_workers_slot_comes_back_after_its_lease(four: Fleet, tmp_path: Path) -> None:
    log = tmp_path / "spans.txt"
    doc = {
        "concurrency": 1,
        "tasks": [
            {"id": "stuck", "handler": "stub", "params": {"delay": 60}, "timeout": 90},
            {"id": "next", "handler": "python:tests.handlers:record_span", "params": {"file": str(log)}},
        ],
    }
    with client_for(four) as client:
        handle = client.submit(parse_plan(doc))
        wait_for(
            lambda: any(t.id == "stuck" and t.status is TaskStatus.RUNNING for t in handle.status().tasks),
            what="the first task holding the only slot",
        )
        holder = next(t.worker for t in handle.status().tasks if t.id == "stuck")
        assert holder is not None
        pid = int(holder.rsplit(":", 1)[1])
        victim = next(p for p in four.procs if str(pid) in _children(p.pid) or p.pid == pid)
        killed_at = time.time()
        four.kill(victim, signal.SIGKILL)
        victim.wait(timeout=10)
        four.procs.remove(victim)
        wait_for(log.exists, timeout=30, what="the second task to get the slot")
        started = float(log.read_text().split()[0])
        handle.cancel()
    # Lease 3 s: the slot is free again a few seconds after the kill, not after the task's 60 s.
    assert started - killed_at < 15


def _children(pid: int) -> str:
    """Pids of a process's children, as text (pool processes of a worker)."""
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return ""
