"""Fleet-wide rate limits: acquire latency and throughput, and a rate-limited run end to end.

1. ``RateLimiter.acquire`` (granted path: a bucket that never runs dry) from one process and
   from four processes sharing one bucket: latency p50/p99 and acquires/s, against the
   baseline, an ``EVALSHA`` of a trivial script (``return 1``) with the same keys and
   arguments, through the same redis-py ``Script`` object, on the same Redis. Goal: p50
   ratio <= x1.3. Diagnostics say where the difference goes: ``_ACQUIRE`` called as a bare
   ``Script`` (no ``RateLimiter`` wrapper), and the Redis server's own microseconds per
   call (``INFO commandstats``). The kinds are called in turn, call by call, in each
   process: whatever the machine does meanwhile falls on all of them alike.
2. The refused path (an empty bucket, each holder joins the waiting line), one process.
3. End to end: a plan of 600 ``stub`` tasks under ``rate_limits: {llm: {per_minute: 6000}}``
   (burst 1) on one ``taskexec worker`` (``--concurrency`` prefork processes). The ideal time
   is what the limit allows, ``(600 - burst) / 100`` s; goal: the run (submit to finished)
   within 10% of it. The same plan without the limit, on the same worker, shows what the
   fleet does unthrottled (the limit cannot be met faster than that).

Real Redis (127.0.0.1:6379, db 13, flushed before and after) and PostgreSQL (a scratch
database, dropped after); every worker started here is stopped.

Run: ``.venv/bin/python -m bench.ratelimit [--acquires N] [--concurrency C]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench.services import (
    REDIS,
    fleet_env,
    flush_bench_redis,
    loadavg,
    scratch_database,
    start_worker,
    stop,
    stub_plan,
    wait_ready,
    wait_run,
)

TRIVIAL = "return 1"
TASKS = 600
PER_MINUTE = 6000.0


def _caller(kind: str, client: redis.Redis, key: str, holder: str) -> Callable[[], Any]:
    """One acquire of ``kind``: ``taskexec``, ``refused``, ``trivial`` or ``script``."""
    from taskexec.models import RateLimit
    from taskexec.run.ratelimit import RateLimiter

    if kind == "taskexec":
        limiter = RateLimiter(client)
        limit = RateLimit(per_minute=1e6, burst=1_000_000)  # never runs dry: the granted path
        return lambda: limiter.acquire(key, limit, holder=holder)
    if kind == "refused":
        limiter = RateLimiter(client)
        limit = RateLimit(per_minute=1, burst=1)
        counter = iter(range(10**9))
        limiter.acquire(key, limit, holder="first")  # the bucket's one token: every later ask waits
        return lambda: limiter.acquire(key, limit, holder=f"{holder}-{next(counter)}")
    from taskexec.run.ratelimit import _ACQUIRE, _keys

    script = client.register_script({"trivial": TRIVIAL, "script": _ACQUIRE}[kind])
    keys = _keys(key)
    args = [1e6 / 60.0, 1_000_000, 1, holder, ""]
    return lambda: script(keys=keys, args=args)


def _worker(kinds: list[str], key: str, holder: str, count: int, start: Any, out: Any) -> None:
    """``count`` calls of each kind, interleaved call by call (each kind on its own bucket)."""
    client = redis.Redis.from_url(REDIS)
    calls = [_caller(kind, client, f"{key}:{kind}", holder) for kind in kinds]
    for _ in range(200):  # connection, script cache, warm code paths
        for call in calls:
            call()
    lat: list[list[float]] = [[0.0] * count for _ in kinds]
    order = list(range(len(kinds)))
    start.wait()
    for i in range(count):
        order.append(order.pop(0))  # no kind always first (or always after another)
        for k in order:
            a = time.perf_counter()
            calls[k]()
            lat[k][i] = time.perf_counter() - a
    out.put(lat)
    client.close()


def measure(kinds: list[str], procs: int, count: int) -> dict[str, dict[str, float]]:
    """p50, p99 (µs) and calls/s of each kind: ``procs`` processes, ``count`` calls each.

    Each process calls the kinds in turn, call by call, so that a drift of the machine
    (another process waking up, the host's other tenants) falls on all of them alike. A
    kind's calls/s is its calls over the time its calls took, per process, summed.
    """
    key = f"taskexec:rl:bench:{uuid.uuid4().hex[:6]}"
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(kinds, key, f"h{i}", count, start, out)) for i in range(procs)
    ]
    for w in workers:
        w.start()
    results = [out.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    stats = {}
    for k, kind in enumerate(kinds):
        xs = sorted(x for lat in results for x in lat[k])
        stats[kind] = {
            "p50": 1e6 * xs[len(xs) // 2],
            "p99": 1e6 * xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "rate": sum(len(lat[k]) / sum(lat[k]) for lat in results),
        }
    return stats


def server_usec(kind: str, count: int) -> float:
    """The Redis server's own microseconds per EVALSHA of ``kind`` (``INFO commandstats`` delta).

    Other clients' EVALSHAs in the same window would count too; the window is short.
    """
    client = redis.Redis.from_url(REDIS)
    call = _caller(kind, client, f"taskexec:rl:bench:{uuid.uuid4().hex[:6]}", "h")
    call()

    def stats() -> tuple[int, float]:
        s = client.info("commandstats").get("cmdstat_evalsha", {})
        return int(s.get("calls", 0)), float(s.get("usec", 0))

    c0, u0 = stats()
    for _ in range(count):
        call()
    c1, u1 = stats()
    client.close()
    return (u1 - u0) / max(1, c1 - c0)


def end_to_end(concurrency: int, logs: Path) -> dict[str, float]:
    """The rate-limited plan and the same plan unthrottled, on one worker; seconds."""
    from taskexec import Client, parse_plan
    from taskexec.settings import Settings

    out: dict[str, float] = {}
    with scratch_database() as db_url:
        name = f"rl-{uuid.uuid4().hex[:6]}"
        proc = start_worker(fleet_env(db_url), name, "executor,validator", concurrency, logs)
        try:
            with Client(Settings(broker_url=REDIS, database_url=db_url)) as client:
                wait_ready(client.app, name)
                for label, limited in (("unthrottled", False), ("limited", True)):
                    doc: dict[str, Any] = stub_plan(f"rl-{label}", TASKS)
                    if limited:
                        doc["rate_limits"] = {"llm": {"per_minute": PER_MINUTE}}
                        doc["tasks"][0]["rate_limit"] = "llm"
                    [manifest] = client.manifests(parse_plan(doc))
                    t_submit = datetime.now(UTC)
                    handle = client.submit(manifest)
                    status, end = wait_run(db_url, handle.run_id, timeout=600)
                    assert status == "succeeded", status
                    result = handle.status()
                    starts = sorted(t.started_at for t in result.tasks if t.started_at)
                    out[f"{label} total"] = (end - t_submit).total_seconds()
                    out[f"{label} span"] = (starts[-1] - starts[0]).total_seconds()
                    out[f"{label} throttled"] = float(result.statistics.throttled)
        finally:
            stop(proc)
    return out


def acquire_lines(acquires: int) -> bool:
    """Print the acquire figures; whether the p50 goal is met from one and from four processes."""
    goal_ok = True
    for procs in (1, 4):
        count = acquires if procs == 1 else acquires // 2
        m = measure(["trivial", "taskexec", "script"], procs, count)
        base, ours, bare = m["trivial"], m["taskexec"], m["script"]
        ratio = ours["p50"] / base["p50"]
        goal_ok &= ratio <= 1.3
        plural = "es" if procs > 1 else ""
        print(
            f"acquire, {procs} process{plural} x {count}, one bucket: RateLimiter.acquire "
            f"p50 {ours['p50']:.0f} µs p99 {ours['p99']:.0f} µs {ours['rate']:.0f}/s | EVALSHA "
            f"'return 1' p50 {base['p50']:.0f} µs p99 {base['p99']:.0f} µs {base['rate']:.0f}/s | "
            f"ratio p50 x{ratio:.2f}, p99 x{ours['p99'] / base['p99']:.2f}, "
            f"throughput x{ours['rate'] / base['rate']:.2f} (goal p50 <= x1.3: "
            f"{'met' if ratio <= 1.3 else 'MISSED'}) | diagnostics: _ACQUIRE called as a bare Script "
            f"p50 {bare['p50']:.0f} µs (x{bare['p50'] / base['p50']:.2f})",
            flush=True,
        )
    srv = {k: server_usec(k, 5000) for k in ("trivial", "taskexec", "refused")}
    print(
        f"Redis server time per EVALSHA (commandstats): acquire granted {srv['taskexec']:.1f} µs, "
        f"refused (joins the line) {srv['refused']:.1f} µs, 'return 1' {srv['trivial']:.1f} µs",
        flush=True,
    )
    refused = measure(["refused"], 1, acquires // 4)["refused"]
    print(
        f"acquire refused (empty bucket, {acquires // 4} holders join the line), 1 process: "
        f"p50 {refused['p50']:.0f} µs p99 {refused['p99']:.0f} µs {refused['rate']:.0f}/s",
        flush=True,
    )
    return goal_ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acquires", type=int, default=20_000, help="calls per process")
    ap.add_argument("--concurrency", type=int, default=2, help="prefork processes of the e2e worker")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end run")
    ap.add_argument("--acquire-only", action="store_true", help="only the acquire latencies")
    args = ap.parse_args()
    print(f"load average before: {loadavg()}", flush=True)
    flush_bench_redis()
    try:
        goal_ok = None if args.e2e_only else acquire_lines(args.acquires)
        if args.acquire_only:
            return
        flush_bench_redis()
        with tempfile.TemporaryDirectory() as d:
            e2e = end_to_end(args.concurrency, Path(d))
        ideal = (TASKS - 1) / (PER_MINUTE / 60)
        total, span = e2e["limited total"], e2e["limited span"]
        within = total <= 1.1 * ideal
        print(
            f"{TASKS} stub tasks under per_minute {PER_MINUTE:g} (burst 1), {args.concurrency} prefork "
            f"processes: run {total:.2f} s, first to last task start {span:.2f} s, "
            f"{e2e['limited throttled']:.0f} throttled waits | ideal {ideal:.2f} s | ratio run/ideal "
            f"x{total / ideal:.2f}, starts/ideal x{span / ideal:.2f} (goal run <= x1.10: "
            f"{'met' if within else 'MISSED'}) | same plan unthrottled {e2e['unthrottled total']:.2f} s "
            f"(x{e2e['unthrottled total'] / ideal:.2f} of ideal)",
            flush=True,
        )
        if goal_ok is not None:
            print(
                f"goal: acquire p50 <= x1.3 of a trivial EVALSHA {'met' if goal_ok else 'MISSED'}; "
                f"rate-limited run within 10% of ideal {'met' if within else 'MISSED'}"
            )
    finally:
        flush_bench_redis()
    print(f"load average after: {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
