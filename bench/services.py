"""What the fleet benchmarks share: Redis db 13, a scratch PostgreSQL database, worker processes.

Benchmarks own Redis db 13 (tests claim 1-12, the acceptance checks 14) and flush only it;
each creates its own PostgreSQL database and drops it, and stops every worker it started
(by process group: a prefork worker's pool children go with it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import redis
import sqlalchemy as sa
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/13"
PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as ``/proc/loadavg`` has them."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def flush_bench_redis() -> None:
    """Empty Redis db 13, the benchmarks' own (never another db)."""
    with redis.Redis.from_url(REDIS) as r:
        r.flushdb()


@contextlib.contextmanager
def scratch_database(prefix: str = "taskexec_bench") -> Iterator[str]:
    """A new PostgreSQL database with taskexec's schema, dropped afterwards; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        from taskexec.store import Store, upgrade

        store = Store(url)
        upgrade(store)
        store.close()
        yield url
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fleet_env(db_url: str, **extra: str) -> dict[str, str]:
    """The environment of taskexec workers on Redis db 13 and ``db_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    env.update({"TASKEXEC_BROKER_URL": REDIS, "TASKEXEC_DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env


def start(argv: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own process group (so that stopping it stops its children)."""
    with log.open("ab") as f:
        return subprocess.Popen(
            list(argv), env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )


def start_worker(
    env: dict[str, str], name: str, queues: str, concurrency: int, logs: Path
) -> subprocess.Popen[bytes]:
    """``taskexec worker`` with node name ``name@host``, ``concurrency`` prefork processes."""
    argv = [sys.executable, "-m", "taskexec", "worker", "--queues", queues, "-c", str(concurrency)]
    return start([*argv, "-n", f"{name}@%h", "-l", "WARNING"], env, logs / f"{name}.log")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal a worker's process group (TERM: warm shutdown), wait, then kill what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # pool children left behind
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def wait_ready(app: Celery, *names: str, timeout: float = 90) -> None:
    """Wait until every named worker (``name@host``) answers a broadcast ping."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            replies = app.control.ping(timeout=0.5)
            if all(any(k.startswith(n + "@") for r in replies for k in r) for n in names):
                return
    raise RuntimeError(f"workers {', '.join(names)} did not answer within {timeout:g} s")


def pool_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The prefork pool processes of a worker (the children of its main process)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def wait_run(db_url: str, run_id: str, timeout: float = 1800, poll: float = 0.02) -> tuple[str, datetime]:
    """Wait until a run ends; its status and ``finished_at`` (the store's clock).

    Polls the status column alone: ``Client.wait`` loads the whole run row, manifest
    included (megabytes at 5,000 tasks), at every poll, and would compete with the
    workers for the machine's two cores.
    """
    from taskexec.store.tables import Run

    engine = sa.create_engine(db_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as c:
                row = c.execute(sa.select(Run.status, Run.finished_at).where(Run.run_id == run_id)).one()
            if row[0] not in ("queued", "running"):
                return row[0], row[1]
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {row[0]} after {timeout:g} s")
            time.sleep(poll)
    finally:
        engine.dispose()


def stub_plan(plan_id: str, n: int, params: dict[str, object] | None = None) -> dict[str, object]:
    """A plan of ``n`` independent ``stub`` tasks (one cartesian matrix task)."""
    return {
        "id": plan_id,
        "tasks": [
            {
                "id": "t",
                "handler": "stub",
                "params": params or {},
                "matrix": {"strategy": "cartesian", "params": {"i": list(range(n))}},
            }
        ],
    }
