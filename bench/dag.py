"""``execution: dag`` against ``stages``: makespan over the critical path, edge latency, throughput.

On a real fleet (one ``taskexec worker``, Redis db 13, a scratch PostgreSQL database), the
same plans run once in each mode, one after the other:

(a) random layered DAGs (``--dags`` of them, ``--tasks`` ``stub`` tasks in ``--layers``
    layers, each task depending on 1-3 tasks of the layer before, durations log-normal
    between 50 ms and 2 s), with ``--slots`` worker processes so that slots are not the
    limit: each run's makespan (the run's start to its end, as stored) over its critical
    path (the longest dependency chain weighted by each task's stored duration, in that
    run). Goal: dag <= 1.05 x critical path + 20 ms per level; stages is the baseline.
(b) the uneven plan of issue 18: 4 layers x 6 chains, each chain depending only on itself,
    one 2 s task per layer (each in a different chain), every other task 0.2 s: critical
    path 2.6 s. Goal: dag within 10% of it.
(c) edge latency of the dag runs of (a) and (b): a task's last upstream task ended ->
    the task started (store timestamps). Goal: median <= 10 ms.
(d) wide independent work: ``--wide`` ``stub`` tasks of no duration, one level, on a worker
    of ``--wide-slots`` processes: tasks per second, both modes. Goal: dag at least stages.

Run: ``.venv/bin/python -m bench.dag [--dags 3] [--tasks 200] [--layers 8] [--slots 64]
[--wide 5000] [--wide-slots 2]``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.services import (
    fleet_env,
    loadavg,
    scratch_database,
    start_worker,
    stop,
    wait_ready,
    wait_run,
)

MODES = ("stages", "dag")
HOST = "redis://127.0.0.1:6379"
#: The Redis URL of the db this benchmark claimed (:func:`claimed_db`).
BROKER: dict[str, str] = {}


@contextlib.contextmanager
def claimed_db() -> Iterator[str]:
    """A Redis db of its own, claimed as test sessions claim theirs (a lock key in db 0):
    db 13 is shared by the other benchmarks, whose workers would take this one's messages."""
    token = f"bench-dag-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with redis.Redis.from_url(f"{HOST}/0") as locks:
        db = next(
            (n for n in range(1, 13) if locks.set(f"taskexec:test-db:{n}", token, nx=True, ex=3600)), None
        )
        if db is None:
            raise SystemExit("every Redis db 1-12 is claimed: try again later")
        url = f"{HOST}/{db}"
        try:
            with redis.Redis.from_url(url) as r:
                r.flushdb()
            yield url
        finally:
            with redis.Redis.from_url(url) as r:
                r.flushdb()
            if locks.get(f"taskexec:test-db:{db}") == token.encode():
                locks.delete(f"taskexec:test-db:{db}")


def flush() -> None:
    with redis.Redis.from_url(BROKER["url"]) as r:
        r.flushdb()


@dataclass
class Ran:
    """One run's figures, from the store."""

    makespan: float
    critical_path: float
    edges: list[float]
    levels: int
    peak: int  # most tasks running at once (store times): above the slots, slots were the limit


def layered(seed: int, tasks: int, layers: int) -> dict[str, Any]:
    """A random layered DAG of ``stub`` tasks: 1-3 upstream tasks in the layer before."""
    rng = random.Random(seed)
    per = [tasks // layers + (1 if k < tasks % layers else 0) for k in range(layers)]
    doc: list[dict[str, Any]] = []
    previous: list[str] = []
    for k, n in enumerate(per):
        current = [f"l{k}n{i}" for i in range(n)]
        for tid in current:
            # log-normal, median ~0.3 s, clipped to [50 ms, 2 s]
            delay = min(2.0, max(0.05, math.exp(rng.gauss(math.log(0.3), 0.9))))
            task: dict[str, Any] = {"id": tid, "handler": "stub", "params": {"delay": round(delay, 3)}}
            if previous:
                task["depends_on"] = rng.sample(previous, rng.randint(1, min(3, len(previous))))
            doc.append(task)
        previous = current
    return {"id": f"layered-{seed}", "tasks": doc}


def uneven() -> dict[str, Any]:
    """Issue 18's plan: 4 layers x 6 chains, one 2 s task per layer (chain = layer), 0.2 s else."""
    tasks = []
    for layer in range(4):
        for chain in range(6):
            task: dict[str, Any] = {
                "id": f"c{chain}l{layer}",
                "handler": "stub",
                "params": {"delay": 2.0 if chain == layer else 0.2},
            }
            if layer:
                task["depends_on"] = [f"c{chain}l{layer - 1}"]
            tasks.append(task)
    return {"id": "uneven", "tasks": tasks}


def run_once(db_url: str, doc: dict[str, Any], mode: str) -> Ran:
    """Submit ``doc`` in ``mode``, wait for its end, read its figures from the store."""
    from taskexec import Client, parse_plan
    from taskexec.metrics.edges import edge_latencies
    from taskexec.settings import Settings
    from taskexec.store import repository as repo

    with Client(Settings(broker_url=BROKER["url"], database_url=db_url)) as client:
        [manifest] = client.manifests(parse_plan(doc))
        handle = client.submit(manifest, execution=mode)
        status, _ = wait_run(db_url, handle.run_id, timeout=600)
        assert status == "succeeded", f"{doc['id']} ({mode}) ended {status}"
        result = client.status(handle.run_id)
        with client.store.begin() as s:
            started = repo.get_run(s, handle.run_id).started_at  # its first dispatch
    assert started is not None and result.finished_at is not None
    took = {
        t.id: (t.finished_at - t.started_at).total_seconds()
        for t in result.tasks
        if t.started_at and t.finished_at
    }
    longest: dict[str, float] = {}
    deps = {t.id: t.depends_on for t in manifest.tasks}
    for t in manifest.tasks:  # the manifest lists tasks after their upstream tasks
        longest[t.id] = took.get(t.id, 0.0) + max((longest[d] for d in deps[t.id]), default=0.0)
    return Ran(
        makespan=(result.finished_at - started).total_seconds(),
        critical_path=max(longest.values()),
        edges=edge_latencies(manifest, result.tasks) if mode == "dag" else [],
        levels=len(manifest.stages),
        peak=peak_running(result.tasks),
    )


def peak_running(tasks: list[Any]) -> int:
    """The most tasks whose stored start..end intervals overlap at one time."""
    marks = sorted(
        [(t.started_at, 1) for t in tasks if t.started_at and t.finished_at]
        + [(t.finished_at, -1) for t in tasks if t.started_at and t.finished_at]
    )
    peak = running = 0
    for _, step in marks:
        running += step
        peak = max(peak, running)
    return peak


def throughput(db_url: str, n: int, mode: str) -> float:
    """Tasks per second of ``n`` independent ``stub`` tasks: submit to the run's end."""
    from taskexec import Client, parse_plan
    from taskexec.settings import Settings

    doc = {
        "id": "wide",
        "tasks": [
            {
                "id": "t",
                "handler": "stub",
                "matrix": {"strategy": "cartesian", "params": {"i": list(range(n))}},
            }
        ],
    }
    with Client(Settings(broker_url=BROKER["url"], database_url=db_url)) as client:
        [manifest] = client.manifests(parse_plan(doc))
        client.store.check()
        handle = client.submit(manifest, execution=mode)
        status, _ = wait_run(db_url, handle.run_id)
        assert status == "succeeded", status
        result = client.status(handle.run_id)
    assert result.finished_at is not None
    return n / (result.finished_at - result.submitted_at).total_seconds()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def graphs(db_url: str, args: argparse.Namespace) -> None:
    """(a), (b) and (c): the layered DAGs and the uneven plan, both modes, on ``--slots``."""
    edges: list[float] = []
    for seed in range(args.dags):
        doc = layered(seed, args.tasks, args.layers)
        ran = {mode: run_once(db_url, doc, mode) for mode in MODES}
        edges += ran["dag"].edges
        s, g = ran["stages"], ran["dag"]
        goal = 1.05 * g.critical_path + 0.02 * g.levels
        print(
            f"(a) layered DAG {seed} ({args.tasks} tasks, {g.levels} levels, {args.slots} slots): "
            f"stages {s.makespan:.2f} s = {s.makespan / s.critical_path:.2f} x critical path "
            f"{s.critical_path:.2f}; dag {g.makespan:.2f} s = {g.makespan / g.critical_path:.2f} x "
            f"critical path {g.critical_path:.2f}, at most {g.peak} running (goal <= {goal:.2f} s): "
            f"{verdict(g.makespan <= goal)}",
            flush=True,
        )
    ran = {mode: run_once(db_url, uneven(), mode) for mode in MODES}
    edges += ran["dag"].edges
    s, g = ran["stages"], ran["dag"]
    print(
        f"(b) 4 x 6 uneven plan (critical path 2.6 s nominal): stages {s.makespan:.2f} s "
        f"({s.makespan / 2.6:.2f} x); dag {g.makespan:.2f} s ({g.makespan / 2.6:.2f} x; "
        f"measured critical path {g.critical_path:.2f}) (goal <= 2.86 s): {verdict(g.makespan <= 2.86)}",
        flush=True,
    )
    med, p95 = statistics.median(edges), pct(edges, 0.95)
    print(
        f"(c) edge latency over {len(edges)} edges of the dag runs: median {1000 * med:.1f} ms, "
        f"p95 {1000 * p95:.1f} ms (goal median <= 10 ms): {verdict(med <= 0.010)}",
        flush=True,
    )


def wide(db_url: str, args: argparse.Namespace) -> None:
    """(d): ``--wide`` independent tasks, both modes, on ``--wide-slots``."""
    rate = {mode: throughput(db_url, args.wide, mode) for mode in MODES}
    print(
        f"(d) {args.wide} independent tasks, {args.wide_slots} slots: stages "
        f"{rate['stages']:.0f} tasks/s, dag {rate['dag']:.0f} tasks/s (goal dag >= stages): "
        f"{verdict(rate['dag'] >= rate['stages'])}",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dags", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--wide", type=int, default=5000)
    ap.add_argument("--wide-slots", type=int, default=2)
    args = ap.parse_args()
    from taskexec.celery_app import close_app, create_app
    from taskexec.settings import Settings

    print(f"load average before: {loadavg()}", flush=True)
    with (
        claimed_db() as BROKER["url"],
        tempfile.TemporaryDirectory() as d,
        scratch_database("taskexec_bench_dag") as db_url,
    ):
        app = create_app(Settings(broker_url=BROKER["url"], database_url=db_url))
        try:
            steps = [(graphs, args.slots, "dag"), (wide, args.wide_slots, "wide")][: 2 if args.wide else 1]
            for step, slots, prefix in steps:
                flush()
                name = f"{prefix}-{uuid.uuid4().hex[:6]}"
                proc = start_worker(
                    fleet_env(db_url, TASKEXEC_BROKER_URL=BROKER["url"]),
                    name,
                    "executor,validator",
                    slots,
                    Path(d),
                )
                try:
                    wait_ready(app, name)
                    run_once(db_url, uneven(), "stages")  # warm the pool processes' imports
                    step(db_url, args)
                finally:
                    stop(proc)
        finally:
            close_app(app)
    print(f"load average after: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
