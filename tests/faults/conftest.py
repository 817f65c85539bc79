"""The fault suite's world: a private Redis and a private PostgreSQL that tests may stop,
stall and restart, worker processes in their own process groups, short timeouts.

Settings chosen so that each case takes seconds: visibility timeout 8 s (tasks may run
at most 7 s), leases of 2 s, a reconciler round every second.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import CI, Fleet, make_fleet_env, wait_for

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)

#: The environment a fault fleet adds to a normal one.
FAULT_SETTINGS = {
    "TASKEXEC_VISIBILITY_TIMEOUT": "8",
    "TASKEXEC_MAX_TASK_TIMEOUT": "7",
    "TASKEXEC_LEASE_SECONDS": "2",
    "TASKEXEC_RECONCILE_INTERVAL": "1",
    "TASKEXEC_DB_RETRY_SECONDS": "30",
    "TASKEXEC_HANDLER_MODULES": "tests.handlers",
    "CANARY_SECRET": "canary-7f3a9c51e2",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _skip_or_fail(why: str) -> None:
    if CI:
        raise RuntimeError(f"the fault suite needs {why}")
    pytest.skip(f"the fault suite needs {why}")


@dataclass
class PrivateRedis:
    """A redis-server of the suite's own on a free loopback port, without persistence."""

    dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.port = self.port or free_port()
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--enable-debug-command", "local"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            wait_for(lambda: _pings(client), timeout=10, what="the private Redis")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart_empty(self) -> None:
        """Kill it (no save) and start it again on the same port: every queue is gone."""
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the suite's own (initdb in a temp dir, run as user postgres)."""

    dir: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        assert PG_BIN is not None
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), *args],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    def init(self) -> None:
        assert PG_BIN is not None
        shutil.chown(self.dir, "postgres")
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(self.dir / "data"),
             "-A", "trust", "-U", "postgres"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        self.port = free_port()

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        self._ctl("-o", opts, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


@pytest.fixture(scope="session")
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        _skip_or_fail("redis-server")
    d = Path(tempfile.mkdtemp(prefix="taskexec-fault-redis-"))
    r = PrivateRedis(d)
    r.start()
    try:
        yield r
    finally:
        r.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    if PG_BIN is None or shutil.which("runuser") is None:
        _skip_or_fail("PostgreSQL's server binaries and runuser")
    d = Path(tempfile.mkdtemp(prefix="taskexec-fault-pg-"))
    pg = PrivatePostgres(d)
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        try:
            pg.stop()
        finally:
            shutil.rmtree(d, ignore_errors=True)


@dataclass
class World:
    """One fault case: the fleet, its services, and where handlers write what they did."""

    fleet: Fleet
    redis: PrivateRedis
    pg: PrivatePostgres
    dir: Path

    @property
    def starts(self) -> Path:
        return self.dir / "starts.txt"

    def ledger_params(self, **extra: object) -> dict[str, object]:
        return {"dsn": self.pg.url, "starts": str(self.starts), **extra}

    def started(self) -> list[tuple[float, int, int, str]]:
        if not self.starts.exists():
            return []
        rows = (line.split() for line in self.starts.read_text().splitlines())
        return [(float(t), int(pid), int(attempt), task) for t, pid, attempt, task in rows]


@pytest.fixture
def world(private_redis: PrivateRedis, private_pg: PrivatePostgres) -> Iterator[World]:
    # /tmp/taskexec-fault-*: the crash-after-commit fault point looks for its marker there.
    d = Path(tempfile.mkdtemp(prefix="taskexec-fault-"))
    env = make_fleet_env(private_redis.url, private_pg.url, d / "home")
    env.update(FAULT_SETTINGS)
    engine = sa.create_engine(private_pg.url.replace("postgresql://", "postgresql+psycopg2://"))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS ledger, ledger_tries"))
        conn.execute(sa.text("CREATE TABLE ledger (key text PRIMARY KEY, task text, attempt int)"))
        conn.execute(sa.text("CREATE TABLE ledger_tries (key text, attempt int)"))
    engine.dispose()
    fleet = Fleet(env, d)
    try:
        yield World(fleet, private_redis, private_pg, d)
    finally:
        fleet.stop()
        if private_redis.proc is None:
            private_redis.start()
        shutil.rmtree(d, ignore_errors=True)


def logs_of(world: World) -> str:
    """Everything the fleet's workers wrote to their logs."""
    return "\n".join(p.read_text(errors="replace") for p in world.dir.glob("*.log"))


def wait_until(cond: object, timeout: float, what: str) -> None:
    """wait_for with the suite's default poll interval."""
    wait_for(cond, timeout=timeout, interval=0.1, what=what)  # type: ignore[arg-type]
