"""Fixtures: real Redis and PostgreSQL (skipped locally when down, failing in CI), real workers.

Each test session uses its own PostgreSQL database and its own Redis db number, so test
runs never collide with each other or with the acceptance checks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from taskexec.store import Store

CI = bool(os.environ.get("CI"))
REDIS_HOST = os.environ.get("TASKEXEC_TEST_REDIS", "redis://127.0.0.1:6379")
PG_ADMIN = os.environ.get("TASKEXEC_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent


def _unavailable(what: str, err: Exception) -> None:
    if CI:
        raise RuntimeError(f"{what} is required in CI: {err}") from err
    pytest.skip(f"{what} is not available: {err}")


def wait_for(
    cond: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> None:
    """Wait until ``cond()`` is truthy, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


#: Redis dbs test sessions may claim; 13 is the benchmarks', 14 the acceptance checks'.
TEST_DBS = range(1, 13)


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """A Redis URL on a db number claimed by this session alone (flushed before and after).

    Sessions claim a db with ``SET NX`` of a lock key in db 0, so that two pytest runs
    on one machine (a developer's and CI's, say) never flush each other's queues.
    """
    locks = redis.Redis.from_url(f"{REDIS_HOST}/0", socket_connect_timeout=2)
    try:
        locks.ping()
    except redis.RedisError as e:
        locks.close()
        _unavailable("Redis on 127.0.0.1:6379", e)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    db = next((n for n in TEST_DBS if locks.set(f"taskexec:test-db:{n}", token, nx=True, ex=4 * 3600)), None)
    if db is None:
        locks.close()
        raise RuntimeError(f"every test Redis db ({TEST_DBS.start}-{TEST_DBS.stop - 1}) is claimed")
    url = f"{REDIS_HOST}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        if locks.get(f"taskexec:test-db:{db}") == token.encode():
            locks.delete(f"taskexec:test-db:{db}")
        locks.close()


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new empty PostgreSQL database, dropped afterwards."""
    name = f"taskexec_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        admin.dispose()
        _unavailable("PostgreSQL on 127.0.0.1:5432", e)
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped at the end."""
    with fresh_database() as url:
        yield url


@dataclass
class Fleet:
    """Worker processes started by a test, with the environment they share with the producer."""

    env: dict[str, str]
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # pid -> node name (before the @)

    def spawn(
        self, queues: str, concurrency: int = 2, name: str | None = None, *extra: str
    ) -> subprocess.Popen[bytes]:
        """Start one `taskexec worker` (without waiting for it); its node name is ``name@host``."""
        name = name or f"w{len(self.procs)}-{uuid.uuid4().hex[:6]}"
        log = (self.logs / f"{name}.log").open("wb")
        argv = [sys.executable, "-m", "taskexec.cli", "worker", "--queues", queues, "-c", str(concurrency)]
        proc = subprocess.Popen(
            [*argv, "-n", f"{name}@%h", "-l", "WARNING", *extra],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
        log.close()
        self.names[proc.pid] = name
        self.procs.append(proc)
        return proc

    def wait_ready(self, *names: str, timeout: float = 60) -> None:
        """Wait until every named worker answers a broadcast ping."""
        from taskexec.celery_app import close_app, create_app

        app = create_app(self.settings())  # type: ignore[arg-type]

        def answered() -> bool:
            try:
                replies = app.control.ping(timeout=0.3)
            except redis.RedisError:  # kombu's first broadcast after a broker restart fails once
                return False
            return all(any(n + "@" in k for r in replies for k in r) for n in names)

        try:
            wait_for(answered, timeout=timeout, what=f"workers {', '.join(names)}")
        finally:
            close_app(app)

    def start(self, queues: str, concurrency: int = 2, name: str | None = None) -> subprocess.Popen[bytes]:
        """Start one `taskexec worker` and wait until it answers a ping."""
        proc = self.spawn(queues, concurrency, name)
        self.wait_ready(self.names[proc.pid])
        return proc

    def start_many(self, *specs: tuple[str, int, str]) -> None:
        """Start several workers ``(queues, concurrency, name)`` at once, then wait for all."""
        for queues, concurrency, name in specs:
            self.spawn(queues, concurrency, name)
        self.wait_ready(*(name for _, _, name in specs))

    def settings(self) -> object:
        from taskexec.settings import Settings

        keys = {
            k.removeprefix("TASKEXEC_").lower(): v for k, v in self.env.items() if k.startswith("TASKEXEC_")
        }
        return Settings(**keys)

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal a worker's whole process group."""
        os.killpg(proc.pid, sig)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # pool children left behind


def make_fleet_env(redis_db: str, pg_url: str, home: Path) -> dict[str, str]:
    """Environment of a fleet on the test Redis and PostgreSQL, with the schema applied."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    env.update(
        {
            "TASKEXEC_BROKER_URL": redis_db,
            "TASKEXEC_DATABASE_URL": pg_url,
            "TASKEXEC_HOME": str(home),
            "TASKEXEC_ALLOWED_HANDLERS": "shell,http,stub,approval,python:tests",
            # The one secret tests read, the fault suite's canary: plans read only what
            # the operator allows. Loopback destinations (TASKEXEC_HTTP_ALLOW) stay off:
            # a test that serves on 127.0.0.1 opts in.
            "TASKEXEC_SECRETS": "CANARY_SECRET",
            "PYTHONPATH": str(ROOT),
        }
    )
    with redis.Redis.from_url(redis_db) as r:
        r.flushdb()
    from taskexec.store import Store, upgrade

    store = Store(pg_url)
    upgrade(store)
    store.close()
    return env


@pytest.fixture
def fleet_env(redis_db: str, pg_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment of a fleet on the test Redis and PostgreSQL, with the schema applied."""
    return make_fleet_env(redis_db, pg_url, tmp_path / "home")


@pytest.fixture
def fleet(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    """An executor and a validator worker (real processes) on the test services."""
    f = Fleet(fleet_env, tmp_path)
    try:
        f.start_many(("executor", 2, "exec"), ("validator", 1, "val"))
        yield f
    finally:
        f.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An empty SQLite store (the embedded mode's), schema created, closed after the test."""
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    s.create_all()
    try:
        yield s
    finally:
        s.close()
