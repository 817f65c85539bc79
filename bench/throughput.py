"""End-to-end throughput and stage gaps of taskexec, against raw Celery in the same run.

Two comparisons at the same number of Celery hops per item (issue 20, goal >= x0.8 each):

(a) one hop: raw Celery ``noop`` on the executor queue, against taskexec ``stub`` tasks
    without criteria (executed on ``executor``, no validation);
(b) two hops: a raw chain ``noop | noop`` on the executor/validator queues, against taskexec
    ``stub`` tasks with one output criterion (executed on ``executor``, validated on
    ``validator``).

Raw items are published one ``apply_async`` at a time, ``--items`` items, ``--concurrency``
prefork processes; taskexec runs a plan of ``--items`` independent ``stub`` tasks (no delay)
on a ``taskexec worker`` with the same number of processes, every state change written to
PostgreSQL.
    The time runs from ``submit`` to the run's ``finished_at``, and is split into: submit
    (the producer), dispatch (stage 0's chord built and published, until the first task
    started), execution (first task started to last task finished) and the end of the run;
(c) stage gaps: 10 stages x 100 tasks dispatched stage by stage, the time from the last
    task of stage k finishing to the first task of stage k + 1 starting, against the same
    shape in raw Celery (a chord of ``noop`` per stage whose body publishes the next one).

Both fleets run with their defaults: no task events from the workers (Flower and
``taskexec metrics`` turn them on while they watch); taskexec's producers send task-sent
events, the raw baseline's do not.

``--profile DIR`` also samples the taskexec worker during (b) with py-spy (``py-spy`` on the
PATH; raw stacks written to DIR) and prints where its processes spend their time, and
profiles the producer's ``submit`` with cProfile.

Real Redis (127.0.0.1:6379, db 13, flushed before and after) and PostgreSQL (a scratch
database, dropped after); every worker started here is stopped.

Run: ``.venv/bin/python -m bench.throughput [--items N] [--concurrency C] [--profile DIR]``
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from celery import Celery, chain, chord

from bench.services import (
    REDIS,
    ROOT,
    fleet_env,
    flush_bench_redis,
    loadavg,
    pool_pids,
    scratch_database,
    start,
    start_worker,
    stop,
    stub_plan,
    wait_ready,
    wait_run,
)

# ---------------------------------------------------------------- raw Celery baseline

raw = Celery("rawbench", broker=REDIS, backend=REDIS)
raw.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue="executor",
    broker_connection_retry_on_startup=True,
)

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client  # noqa: PLW0603 - one per worker process
    if _client is None:
        _client = redis.Redis.from_url(REDIS)
    return _client


@raw.task(name="rawbench.noop")
def noop(*_args: object) -> None:
    """Does nothing: the floor of a Celery task's cost."""


@raw.task(name="rawbench.stamp")
def stamp(key: str, stage: int) -> None:
    """A no-op that records when it started and ended (for the stage gap baseline)."""
    began = time.time()
    _redis().rpush(key, f"{stage} {began} {time.time()}")


@raw.task(name="rawbench.next_stage")
def next_stage(key: str, stage: int, stages: int, per_stage: int) -> None:
    """Chord body: publish the chord of ``stage`` (stage-by-stage dispatch, as taskexec does)."""
    if stage >= stages:
        _redis().rpush(key + ":done", "1")
        return
    header = [stamp.si(key, stage).set(queue="executor") for _ in range(per_stage)]
    chord(header, next_stage.si(key, stage + 1, stages, per_stage).set(queue="control")).apply_async()


def start_raw_worker(concurrency: int, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    name = f"raw-{uuid.uuid4().hex[:6]}"
    argv = [sys.executable, "-m", "celery", "-A", "bench.throughput:raw", "worker"]
    argv += ["-Q", "executor,validator,control", "-c", str(concurrency), "-n", f"{name}@%h"]
    argv += ["-l", "WARNING", "--without-gossip", "--without-mingle"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return start(argv, env, logs / f"{name}.log"), name


def bench_raw(items: int, hops: int = 2) -> tuple[float, float]:
    """Seconds for ``items`` ``noop`` tasks (``hops=1``) or ``noop | noop`` chains (``hops=2``),
    and the seconds spent publishing them."""
    t0 = time.perf_counter()
    results = [
        (
            chain(noop.si().set(queue="executor"), noop.si().set(queue="validator")).apply_async()
            if hops == 2
            else noop.si().set(queue="executor").apply_async()
        )
        for _ in range(items)
    ]
    published = time.perf_counter() - t0
    for r in results:
        r.get(timeout=600)
    return time.perf_counter() - t0, published


def raw_stage_gaps(stages: int, per_stage: int) -> tuple[float, list[float]]:
    """Raw Celery, stage by stage: the wall time and the gaps between stages."""
    key = f"rawbench:stages:{uuid.uuid4().hex[:6]}"
    client = _redis()
    t0 = time.perf_counter()
    next_stage.si(key, 0, stages, per_stage).apply_async(queue="control")
    if client.blpop([key + ":done"], timeout=600) is None:
        raise TimeoutError("raw stage-by-stage chords did not finish")
    wall = time.perf_counter() - t0
    by_stage: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for entry in client.lrange(key, 0, -1):
        stage, began, ended = entry.decode().split()
        by_stage[int(stage)].append((float(began), float(ended)))
    client.delete(key)
    return wall, [
        min(b for b, _ in by_stage[k + 1]) - max(e for _, e in by_stage[k]) for k in range(stages - 1)
    ]


# ---------------------------------------------------------------- taskexec


class Timings:
    """One taskexec run's timings, from the store's timestamps."""

    def __init__(self, db_url: str, run_id: str, t_submit: datetime, submit_s: float, end: datetime) -> None:
        from sqlalchemy import func, select

        from taskexec.store import Store, results
        from taskexec.store.tables import ExecutionLog

        store = Store(db_url)
        with store.begin() as s:
            self.tasks = results.run_result(s, run_id).tasks
            # When each task was marked queued: the dispatch of its stage (chord body done).
            rows = s.execute(
                select(ExecutionLog.task_id, func.min(ExecutionLog.at))
                .where(ExecutionLog.run_id == run_id, ExecutionLog.to_status == "queued")
                .group_by(ExecutionLog.task_id)
            )
            self.queued_at = {tid: at for tid, at in rows}
        store.close()
        self.total = (end - t_submit).total_seconds()
        self.submit = submit_s
        first = min(t.started_at for t in self.tasks if t.started_at)
        last = max(t.finished_at for t in self.tasks if t.finished_at)
        self.dispatch = (first - t_submit).total_seconds() - submit_s
        self.execution = (last - first).total_seconds()
        self.ending = (end - last).total_seconds()

    def stage_gaps(self) -> list[tuple[float, float]]:
        """Per stage boundary: (last of k finished -> k + 1 queued, k + 1 queued -> first started)."""
        by_stage: dict[int, list[Any]] = collections.defaultdict(list)
        for t in self.tasks:
            by_stage[t.stage].append(t)
        gaps = []
        for k in sorted(by_stage)[:-1]:
            ended = max(t.finished_at for t in by_stage[k])
            queued = min(self.queued_at[t.id] for t in by_stage[k + 1])
            started = min(t.started_at for t in by_stage[k + 1])
            gaps.append(((queued - ended).total_seconds(), (started - queued).total_seconds()))
        return gaps


def run_plan(doc: dict[str, Any], db_url: str, profile: Path | None = None) -> Timings:
    """Submit a plan, wait for its end (polling the status column only), read its timings."""
    from taskexec import Client, parse_plan
    from taskexec.settings import Settings

    with Client(Settings(broker_url=REDIS, database_url=db_url)) as client:
        [manifest] = client.manifests(parse_plan(doc))
        client.store.check()  # connections opened before the clock starts, as a producer's are
        client.redis.ping()
        prof = cProfile.Profile() if profile else None
        t_submit = datetime.now(UTC)
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        handle = client.submit(manifest)
        if prof:
            prof.disable()
        submit_s = time.perf_counter() - t0
        status, end = wait_run(db_url, handle.run_id)
        assert status == "succeeded", status
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(12)
        print(f"producer submit (cProfile, {submit_s:.3f} s), top by cumulative time:")
        print("\n".join("  " + line for line in out.getvalue().splitlines() if line.strip()[:1].isdigit()))
    return Timings(db_url, handle.run_id, t_submit, submit_s, end)


# ---------------------------------------------------------------- profile


class Sampler:
    """py-spy recording a worker's main and pool processes (raw stacks, one file each)."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            raise SystemExit("--profile needs py-spy on the PATH (pip install py-spy)")
        out.mkdir(parents=True, exist_ok=True)
        self.files = {"main": [out / "main.txt"], "pool": []}
        targets = [(proc.pid, out / "main.txt")]
        for pid in pool_pids(proc):
            self.files["pool"].append(out / f"pool-{pid}.txt")
            targets.append((pid, out / f"pool-{pid}.txt"))
        self.spies = [
            subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--rate", "100", "--format", "raw", "-o", str(f)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, f in targets
        ]
        time.sleep(1.0)  # attached before the run starts

    def stop(self) -> None:
        for s in self.spies:
            s.send_signal(signal.SIGINT)
        for s in self.spies:
            s.wait(timeout=60)

    def report(self) -> None:
        for group, files in self.files.items():
            counts = _stacks(files)
            total = sum(counts.values()) or 1
            deepest: collections.Counter[str] = collections.Counter()
            leaf: collections.Counter[str] = collections.Counter()
            for stack, n in counts.items():
                frames = stack.split(";")
                ours = [f for f in frames if re.search(r"\((taskexec|workers)/", f)]
                deepest[ours[-1] if ours else "(no taskexec frame)"] += n
                leaf[frames[-1]] += n
            print(f"py-spy, worker {group} ({total} samples on CPU at 100 Hz): deepest taskexec frame")
            for frame, n in deepest.most_common(12):
                print(f"  {100 * n / total:5.1f}%  {frame}")
            print(f"py-spy, worker {group}: innermost frame")
            for frame, n in leaf.most_common(8):
                print(f"  {100 * n / total:5.1f}%  {frame}")


def _stacks(files: list[Path]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for f in files:
        if f.exists():
            for line in f.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if n.isdigit():
                    counts[stack] += int(n)
    return counts


# ---------------------------------------------------------------- main


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--stages", type=int, default=10)
    ap.add_argument("--per-stage", type=int, default=100)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the worker, cProfile the producer")
    args = ap.parse_args()
    n, c = args.items, args.concurrency
    print(f"load average before: {loadavg()}", flush=True)
    flush_bench_redis()
    try:
        with tempfile.TemporaryDirectory() as d:
            logs = Path(d)
            proc, name = start_raw_worker(c, logs)
            try:
                wait_ready(raw, name)
                raw1_s, _ = bench_raw(n, hops=1)
                raw_s, _ = bench_raw(n)
                raw_wall, raw_gaps = raw_stage_gaps(args.stages, args.per_stage)
            finally:
                stop(proc)
                raw.close()
            flush_bench_redis()
            with scratch_database() as db_url:
                from taskexec.celery_app import close_app, create_app
                from taskexec.settings import Settings

                name = f"te-{uuid.uuid4().hex[:6]}"
                proc = start_worker(fleet_env(db_url), name, "executor,validator", c, logs)
                app = create_app(Settings(broker_url=REDIS, database_url=db_url))
                try:
                    wait_ready(app, name)
                    sampler = Sampler(proc, args.profile) if args.profile else None
                    flat = run_plan(stub_plan("flat", n), db_url)
                    checked = stub_plan("checked", n)
                    checked["tasks"][0]["validate"] = [{"path": "task_id", "op": "exists"}]  # type: ignore[index]
                    validated = run_plan(checked, db_url, args.profile)
                    if sampler:
                        sampler.stop()
                    tasks = [
                        {
                            "id": f"s{k}",
                            "handler": "stub",
                            **({"depends_on": [f"s{k - 1}"]} if k else {}),
                            "matrix": {"strategy": "cartesian", "params": {"i": list(range(args.per_stage))}},
                        }
                        for k in range(args.stages)
                    ]
                    staged = run_plan({"id": "stages", "tasks": tasks}, db_url)
                finally:
                    close_app(app)
                    stop(proc)
    finally:
        flush_bench_redis()

    for hops, raw_time, te, what in (
        (1, raw1_s, flat, "stub tasks without criteria (execute)"),
        (2, raw_s, validated, "stub tasks with one criterion (execute on executor, validate on validator)"),
    ):
        raw_rate, te_rate = n / raw_time, n / te.total
        goal = "met" if te_rate / raw_rate >= 0.8 else "MISSED"
        shape = "noop" if hops == 1 else "chain noop|noop"
        print(
            f"{hops} hop(s): raw Celery {shape}, {n} items, {c} prefork processes: {raw_time:.2f} s = "
            f"{raw_rate:.0f} items/s | taskexec {n} {what}: {te.total:.2f} s = {te_rate:.0f} tasks/s "
            f"(submit {te.submit:.2f} s, dispatch {te.dispatch:.2f} s, execution {te.execution:.2f} s, "
            f"end {te.ending:.2f} s) | ratio x{te_rate / raw_rate:.2f} (goal >= x0.8: {goal})"
        )
    parts, rgaps = staged.stage_gaps(), raw_gaps
    gaps = [a + b for a, b in parts]
    med, rmed = statistics.median(gaps), statistics.median(rgaps)
    print(
        f"{args.stages} stages x {args.per_stage} tasks: taskexec {staged.total:.2f} s, stage gap median "
        f"{med * 1000:.0f} ms, p95 {p95(gaps) * 1000:.0f} ms (median of its parts: last task of k ended "
        f"-> stage k + 1 marked queued {statistics.median(a for a, _ in parts) * 1000:.0f} ms, queued -> "
        f"first task started {statistics.median(b for _, b in parts) * 1000:.0f} ms) | raw Celery chord "
        f"per stage {raw_wall:.2f} s, median {rmed * 1000:.0f} ms, p95 {p95(rgaps) * 1000:.0f} ms | "
        f"median ratio x{med / rmed:.1f} (goal: median <= 10 ms and p95 <= 30 ms: "
        f"{'met' if med <= 0.010 and p95(gaps) <= 0.030 else 'MISSED'})"
    )
    print(f"load average after: {loadavg()}", flush=True)
    if args.profile:
        sampler.report()  # type: ignore[possibly-undefined]


if __name__ == "__main__":
    main()
