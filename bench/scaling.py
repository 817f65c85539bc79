"""Horizontal scaling: a plan's throughput on 1, 2 and 4 executor worker process groups.

Each executor is its own ``taskexec worker --queues executor -c 1 -n executorK@%h`` (a
separate process group, as on separate hosts), beside one ``validator1`` worker. For each
fleet size, a plan of ``--tasks`` independent ``stub`` tasks runs twice: without delay
(bound by the store and the broker, so by the machine's two cores) and with a 50 ms sleep
per task (I/O bound). The baseline is the 1-executor fleet in the same run: the speed-up is
tasks/s against it. The ideal of the sleeping plan is one task per 50 ms per executor.
Goal: the I/O-bound speed-up from 1 to 4 executors is at least x3. Each line also gives the
share of the tasks each executor ran (from the tasks' ``worker`` field).

Real Redis (127.0.0.1:6379, db 13, flushed before and after) and PostgreSQL (a scratch
database, dropped after); every worker started here is stopped.

Run: ``.venv/bin/python -m bench.scaling [--tasks N] [--sizes 1 2 4]``
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.services import (
    REDIS,
    fleet_env,
    flush_bench_redis,
    loadavg,
    pool_pids,
    scratch_database,
    start_worker,
    stop,
    stub_plan,
    wait_ready,
    wait_run,
)

DELAY = 0.05


def run_fleet(executors: int, tasks: int, db_url: str, logs: Path) -> dict[str, tuple[float, str]]:
    """Start ``executors`` executor groups and a validator, run both plans; seconds and spread."""
    from taskexec import Client, parse_plan
    from taskexec.settings import Settings

    env = fleet_env(db_url)
    # Node names as an operator gives them (``-n executor1@%h``); db 13 is the benchmarks' alone.
    names = [f"executor{k}" for k in range(1, executors + 1)]
    procs = {n: start_worker(env, n, "executor", 1, logs) for n in names}
    procs["validator1"] = start_worker(env, "validator1", "validator", 1, logs)
    out: dict[str, tuple[float, str]] = {}
    try:
        with Client(Settings(broker_url=REDIS, database_url=db_url)) as client:
            wait_ready(client.app, *procs)
            group_of = {pid: n for n, p in procs.items() for pid in pool_pids(p)}
            for label, params in (("no delay", {}), ("sleep 50 ms", {"delay": DELAY})):
                [manifest] = client.manifests(parse_plan(stub_plan(f"scale-{executors}", tasks, params)))
                t0 = datetime.now(UTC)
                handle = client.submit(manifest)
                status, end = wait_run(db_url, handle.run_id, timeout=1800)
                assert status == "succeeded", status
                by = collections.Counter(
                    group_of.get(int((t.worker or ":0").rsplit(":", 1)[-1]), t.worker)
                    for t in handle.status().tasks
                )
                spread = " ".join(f"{g} {100 * c / tasks:.0f}%" for g, c in sorted(by.items()))
                out[label] = ((end - t0).total_seconds(), spread)
    finally:
        for p in procs.values():
            stop(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    print(f"load average before: {loadavg()}", flush=True)
    results: dict[int, dict[str, tuple[float, str]]] = {}
    flush_bench_redis()
    try:
        with tempfile.TemporaryDirectory() as d, scratch_database() as db_url:
            for n in args.sizes:
                results[n] = run_fleet(n, args.tasks, db_url, Path(d))
                flush_bench_redis()
                for label, (secs, spread) in results[n].items():
                    print(f"  {n} executor(s), {label}: {secs:.2f} s; {spread}", flush=True)
    finally:
        flush_bench_redis()
    base_n = args.sizes[0]
    for label in ("no delay", "sleep 50 ms"):
        base = args.tasks / results[base_n][label][0]
        cells = []
        for n in args.sizes:
            rate = args.tasks / results[n][label][0]
            ideal = f", ideal {n / DELAY:.0f}/s" if label != "no delay" else ""
            cells.append(f"{n} executor(s) {rate:.0f} tasks/s x{rate / base:.2f}{ideal}")
        line = f"{args.tasks} stub tasks, {label}, 1 validator: " + " | ".join(cells)
        line += f" (baseline: {base_n} executor(s))"
        if label != "no delay" and base_n == 1 and 4 in results:
            speed_up = results[1][label][0] / results[4][label][0]
            line += f"; speed-up 1 -> 4 x{speed_up:.2f} (goal >= x3: {'met' if speed_up >= 3 else 'MISSED'})"
        print(line)
    print(f"load average after: {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
