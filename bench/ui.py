"""The dashboard's server time at scale, with the CLI's read paths as baselines in the same run.

On a scratch PostgreSQL database: 100,000 one-task runs, and one run of 10,000 tasks (10
stages of 1,000, half of them run: an attempt each, a tenth retried). Timed, server side
(an in-process ASGI client, so the time is the app's: routing, queries, rendering):

- the runs list's first page and a page 1,000 deep (keyset), against ``Client.runs``
  (``taskexec runs --json``'s read, first 50);
- the 10,000-task run's page and its task table's first page (``/api/v1/runs/{id}/tasks``),
  against ``Client.status`` (``taskexec status --json``'s read);
- live updates: the time from a change published on the run's channel to its
  ``event: change`` on an open page's stream, and the Redis pattern subscriptions that 50
  open pages cost (connections on db 13 with a pattern subscription), through a real
  uvicorn server.

Run: ``.venv/bin/python bench/ui.py [runs] [tasks]`` (Redis db 13, a scratch database).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import redis
from fastapi.testclient import TestClient
from sqlalchemy import insert

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from bench.services import REDIS, flush_bench_redis, loadavg, scratch_database
from taskexec import Client, Settings
from taskexec.celery_app import close_app
from taskexec.celery_app import create_app as celery_app
from taskexec.models import Change, ManifestTask, RunManifest, TaskStatus
from taskexec.run import events
from taskexec.services import Services
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.store.tables import Execution, Run, utcnow
from taskexec.ui import create_app, serve_in_background
from taskexec.ui.board import Board
from taskexec.ui.hub import EventHub

REPEATS = 15


def timed(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def many_runs(store: Store, n: int) -> None:
    """``n`` finished one-task runs, a second apart, inserted in batches."""
    manifest = RunManifest(
        plan_id="bulk", stages=[["t"]], tasks=[ManifestTask(id="t", stage=0, handler="stub")]
    )
    doc = manifest.model_dump(mode="json", by_alias=True)
    base = utcnow() - timedelta(days=3)
    statuses = ["succeeded"] * 8 + ["failed", "cancelled"]
    for start in range(0, n, 5000):
        runs, tasks = [], []
        for i in range(start, min(n, start + 5000)):
            run_id = uuid.uuid4().hex
            at = base + timedelta(seconds=i)
            status = statuses[i % len(statuses)]
            runs.append(
                {
                    "run_id": run_id,
                    "plan_id": f"plan-{i % 20}",
                    "plan_name": None,
                    "variant": "default",
                    "status": status,
                    "manifest": doc,
                    "statistics": {"total": 1, status if status != "cancelled" else "cancelled": 1},
                    "tenant": f"tenant-{i % 5}",
                    "labels": {"env": "prod" if i % 2 else "staging"},
                    "stage_count": 1,
                    "stage_cursor": 1,
                    "epoch": 0,
                    "submitted_at": at,
                    "started_at": at,
                    "finished_at": at + timedelta(seconds=2),
                    "updated_at": at + timedelta(seconds=2),
                }
            )
            tasks.append(
                {
                    "run_id": run_id,
                    "task_id": "t",
                    "stage": 0,
                    "status": status,
                    "attempts": 1,
                    "updated_at": at,
                }
            )
        with store.begin() as s:
            s.execute(insert(Run), runs)
            s.execute(insert(Execution), tasks)


def big_run(store: Store, n: int) -> str:
    """A run of ``n`` tasks in 10 stages, the first half run (an attempt each, a tenth retried)."""
    per = n // 10
    tasks = [
        ManifestTask(
            id=f"s{k}-t{i}",
            stage=k,
            handler="stub",
            depends_on=[f"s{k - 1}-t{i}"] if k else [],
        )
        for k in range(10)
        for i in range(per)
    ]
    manifest = RunManifest(
        plan_id="big", stages=[[f"s{k}-t{i}" for i in range(per)] for k in range(10)], tasks=tasks
    )
    run_id = uuid.uuid4().hex
    done = [t.id for t in tasks[: n // 2]]
    with store.begin() as s:
        repo.add_run(s, run_id, manifest)
        repo.set_tasks_status(s, run_id, done, TaskStatus.QUEUED)
    with store.begin() as s:
        for k, tid in enumerate(done):
            repo.claim_attempt(
                s, run_id, tid, f"bench@host:{k % 8}", lease_until=utcnow() + timedelta(hours=1)
            )
    with store.begin() as s:
        repo.set_tasks_status(s, run_id, done, TaskStatus.SUCCEEDED, output={"ok": True})
    return run_id


def subscribers(r: redis.Redis) -> int:
    """Connections to the benchmarks' Redis db (13) holding a pattern subscription: the
    server is shared, its PUBSUB NUMPAT counts everyone's."""
    return sum(1 for c in r.client_list() if c.get("db") == "13" and int(c.get("psub", 0)) > 0)


def live(settings: Settings, store: Store, run_id: str) -> tuple[float, int, int]:
    """(median ms from publish to event, NUMPAT before and with 50 open pages) on uvicorn."""
    app = celery_app(settings)
    r = redis.Redis.from_url(REDIS)
    try:
        url, stop = serve_in_background(Services(settings, app, store, r))
        try:
            before = subscribers(r)
            opened = threading.Barrier(51)
            stop_pages = threading.Event()

            def page() -> None:
                with (
                    httpx.Client(base_url=url, timeout=30) as http,
                    http.stream("GET", f"/runs/{run_id}/events") as stream,
                ):
                    next(stream.iter_lines())
                    opened.wait()
                    stop_pages.wait()

            threads = [threading.Thread(target=page, daemon=True) for _ in range(50)]
            for t in threads:
                t.start()
            opened.wait()
            time.sleep(1.0)  # the hub's thread subscribes once
            with_pages = subscribers(r)
            latencies = []
            with (
                httpx.Client(base_url=url, timeout=30) as http,
                http.stream("GET", f"/runs/{run_id}/events") as stream,
            ):
                lines = stream.iter_lines()
                next(lines)
                time.sleep(0.5)
                for _ in range(10):
                    t0 = time.perf_counter()
                    events.publish(r, [Change(run_id, "s0-t0", "succeeded")])
                    while not next(lines).startswith("event: change"):
                        pass
                    latencies.append((time.perf_counter() - t0) * 1000)
                    time.sleep(0.3)
            stop_pages.set()
        finally:
            stop()
    finally:
        r.close()
        close_app(app)
    return statistics.median(latencies), before, with_pages


def main() -> None:
    n_runs = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    n_tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    flush_bench_redis()
    print(f"load average before: {loadavg()}")
    with scratch_database("taskexec_bench_ui") as url:
        settings = Settings(broker_url=REDIS, database_url=url)
        store = Store(url)
        try:
            t0 = time.perf_counter()
            many_runs(store, n_runs)
            run_id = big_run(store, n_tasks)
            with store.engine.begin() as c:
                c.exec_driver_sql("ANALYZE")
            print(f"{n_runs} runs and a {n_tasks}-task run inserted in {time.perf_counter() - t0:.1f} s")
            board = Board(settings, store, None)
            client = Client(settings, store=store)
            with TestClient(create_app(board, EventHub(None))) as web:
                cursor = None
                for _ in range(1000):  # a page 1,000 deep (50,000 runs in)
                    cursor = web.get("/api/v1/runs", params={"cursor": cursor} if cursor else {}).json()[
                        "next_cursor"
                    ]
                rows = [
                    (
                        "runs list, first page (HTML)",
                        timed(lambda: web.get("/")),
                        "Client.runs(limit=50)",
                        timed(lambda: client.runs(limit=50)),
                    ),
                    (
                        "runs list, page 1,000 deep (JSON)",
                        timed(lambda: web.get("/api/v1/runs", params={"cursor": cursor})),
                        "",
                        None,
                    ),
                    (
                        "runs list filtered (status, label)",
                        timed(lambda: web.get("/", params={"status": "failed", "label": "env=prod"})),
                        "",
                        None,
                    ),
                    (
                        f"run page, {n_tasks} tasks (HTML)",
                        timed(lambda: web.get(f"/runs/{run_id}"), 7),
                        "Client.status (taskexec status)",
                        timed(lambda: client.status(run_id), 7),
                    ),
                    (
                        "task table, first page (JSON)",
                        timed(lambda: web.get(f"/api/v1/runs/{run_id}/tasks")),
                        "",
                        None,
                    ),
                    (
                        "task drawer (HTML fragment)",
                        timed(lambda: web.get(f"/runs/{run_id}/tasks/s0-t1")),
                        "",
                        None,
                    ),
                ]
            client.close()
            print(f"\n{'request':<40} {'ms':>8}   baseline {'':<32} {'ms':>8}")
            for name, ms, base, base_ms in rows:
                tail = f"{base:<41} {base_ms:8.1f}" if base_ms is not None else ""
                print(f"{name:<40} {ms:8.1f}   {tail}")
            latency, before, with_pages = live(settings, store, run_id)
            print(f"\nlive: change published -> event on an open page: median {latency:.1f} ms (10 changes)")
            print(
                f"Redis connections subscribed to a pattern: {before} before, {with_pages} with 50 open pages"
            )
        finally:
            store.close()
    print(f"load average after: {loadavg()}")


if __name__ == "__main__":
    main()
