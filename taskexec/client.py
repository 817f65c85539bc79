"""The producer's Python API: submit plans, wait for runs, read results, cancel, resume.

Without ``TASKEXEC_BROKER_URL``, :meth:`Client.from_env` runs embedded, as ``taskexec run``
does: the client starts a private fleet (Redis, a SQLite store under ``TASKEXEC_HOME``, a
local worker) when it first needs one and stops it when closed.

Example:
    >>> from taskexec import Client, load_plan
    >>> with Client.from_env() as client:                # doctest: +SKIP
    ...     run = client.submit(load_plan("examples/quickstart.yaml"))
    ...     run.wait(timeout=120).status
    <RunStatus.SUCCEEDED: 'succeeded'>
"""

from __future__ import annotations

import getpass
import socket
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from taskexec.celery_app import close_app, create_app, redis_url
from taskexec.errors import (
    BrokerUnavailableError,
    HandlerNotAllowedError,
    InvalidInputError,
    PlanError,
    RunNotFoundError,
    WaitTimeoutError,
)
from taskexec.models import (
    AttemptLog,
    FlowState,
    LimitState,
    ManifestTask,
    RetryPolicy,
    RunManifest,
    RunResult,
    RunStatus,
    RunSummary,
    TaskResult,
    TaskStatus,
)
from taskexec.plan import Plan
from taskexec.plan.compiler import compile_plan
from taskexec.plan.params import with_params
from taskexec.run import producer
from taskexec.run.ratelimit import RateLimiter, Slots, bucket_key, slots_key
from taskexec.services import Services
from taskexec.settings import Settings
from taskexec.store import Store, results, upgrade
from taskexec.store import repository as repo

if TYPE_CHECKING:
    from taskexec.embedded import EmbeddedFleet

__all__ = ["Client", "RunHandle"]


@dataclass(frozen=True)
class RunHandle:
    """A submitted run.

    Example:
        >>> handle.wait(timeout=60).statistics.succeeded  # doctest: +SKIP
        4
    """

    run_id: str
    client: Client

    def status(self) -> RunResult:
        """The run's result as it stands now."""
        return self.client.status(self.run_id)

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> RunResult:
        """Block until the run ends; its result.

        Raises:
            WaitTimeoutError: The run had not ended after ``timeout`` seconds (E002; also a
                ``TimeoutError``, as Celery's ``AsyncResult.get`` raises). The run goes on.
        """
        return self.client.wait(self.run_id, timeout=timeout, poll=poll)

    def cancel(self) -> RunStatus:
        """Cancel the run; its status after the call."""
        return self.client.cancel(self.run_id)


class Client:
    """Talks to a fleet: the broker (Celery), Redis and the result store.

    With ``embedded=True`` and no broker configured (what :meth:`from_env` does), the client
    starts an embedded fleet when it first needs a broker and stops it in :meth:`close`.

    Example:
        >>> client = Client(Settings(broker_url="redis://127.0.0.1:6379/0",
        ...                          database_url="postgresql://postgres@127.0.0.1/taskexec"))
        ...                                                   # doctest: +SKIP
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        app: Celery | None = None,
        store: Store | None = None,
        embedded: bool = False,
    ) -> None:
        self.settings = settings or Settings()
        self._app = app
        self._store = store
        self._owned: list[str] = []  # what close() closes: only what this client created
        self._redis: redis.Redis | None = None
        self._embedded = embedded and self.settings.embedded and app is None
        self._fleet: EmbeddedFleet | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close(exc_type, exc, tb)

    def close(self) -> None:
        """Close the connections this client opened (Redis, the store's pool, the broker's);
        stop its embedded fleet, if it started one (its unfinished runs are cancelled)."""
        self._close(None, None, None)

    def _close(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._app is not None and "app" in self._owned:
            close_app(self._app)
            self._app = None
            self._owned.remove("app")
        fleet, self._fleet = self._fleet, None
        try:
            if fleet is not None:
                fleet.__exit__(exc_type, exc, tb)
        finally:
            if self._store is not None and "store" in self._owned:
                self._store.close()

    @classmethod
    def from_env(cls) -> Client:
        """A client configured by the ``TASKEXEC_*`` environment variables.

        Without ``TASKEXEC_BROKER_URL`` it runs embedded, as ``taskexec run`` does: on first
        use it starts a private Redis, a SQLite store under ``TASKEXEC_HOME`` and a local
        worker, which :meth:`close` (or the end of a ``with`` block) stops, cancelling the
        runs that have not ended. Use it as a context manager.

        Example:
            >>> with Client.from_env() as client:  # doctest: +SKIP
            ...     client.submit(plan).wait(timeout=600)
        """
        return cls(Settings(), embedded=True)

    @property
    def fleet(self) -> EmbeddedFleet | None:
        """The embedded fleet this client started, if it did."""
        return self._fleet

    def _need_broker(self) -> None:
        """Make sure a broker is configured: start the embedded fleet, or say what to set.

        Raises:
            BrokerUnavailableError: No broker is configured and this client does not run
                embedded (E013).
        """
        if self.settings.broker_url or self._fleet is not None:
            return
        if not self._embedded:
            raise BrokerUnavailableError(
                "no broker configured: set TASKEXEC_BROKER_URL to the fleet's Redis "
                "(redis://HOST:6379/0), or use Client.from_env() without it to run on an embedded "
                "fleet (a private Redis, SQLite under TASKEXEC_HOME and a local worker)",
                path="TASKEXEC_BROKER_URL",
            )
        from taskexec.embedded import EmbeddedFleet

        fleet = EmbeddedFleet(
            self.settings.home, concurrency=self.settings.worker_concurrency, base=self.settings
        )
        fleet.__enter__()  # stops what it started if the start fails
        self._fleet = fleet
        self.settings = fleet.settings

    @property
    def app(self) -> Celery:
        """The Celery app used to publish (created on first use)."""
        if self._app is None:
            self._need_broker()
            self._app = create_app(self.settings)
            self._owned.append("app")
        return self._app

    @property
    def store(self) -> Store:
        """The result store (created on first use)."""
        if self._store is None:
            self._store = Store.from_settings(self.settings)
            self._owned.append("store")
            if self.settings.embedded and not self.settings.database_url:
                # Embedded mode owns its SQLite file: reading a fresh home is an empty store.
                upgrade(self._store)
        return self._store

    @property
    def redis(self) -> redis.Redis:
        """A Redis client for the broker's server (rate limits, events, cancel flags)."""
        if self._redis is None:
            self._need_broker()
            self._redis = redis.Redis.from_url(
                redis_url(self.settings), socket_connect_timeout=5, socket_timeout=10
            )
        return self._redis

    @property
    def services(self) -> Services:
        """This client's settings, Celery app, store and Redis, for the run's code."""
        return Services(self.settings, self.app, self.store, self.redis)

    def manifests(self, plan: Plan | RunManifest, variant: str | None = None) -> list[RunManifest]:
        """The manifests a plan compiles to (a manifest stands for itself)."""
        if isinstance(plan, RunManifest):
            return [plan]
        return compile_plan(plan, self.settings, variant=variant)

    def submit(
        self,
        plan: Plan | RunManifest,
        *,
        tenant: str | None = None,
        labels: dict[str, str] | None = None,
        variant: str | None = None,
        params: dict[str, Any] | None = None,
        execution: str | None = None,
    ) -> RunHandle:
        """Submit one run: a manifest, or a plan with one variant (or ``variant`` named).

        ``params`` override the plan's run parameters (``params:``), e.g.
        ``client.submit(plan, params={"model": "gpt-4o"})``; the run stores what it used.
        ``execution`` (``"stages"`` or ``"dag"``) overrides the plan's ``execution:``.

        Raises:
            PlanError: The plan is invalid, has several variants and none was named, or a
                param is unknown or of the wrong type (E001 naming it).
        """
        manifests = self.manifests(plan, variant)
        if len(manifests) != 1:
            raise PlanError(
                f"the plan has {len(manifests)} variants: name one, or use submit_all", path="variant"
            )
        return self.submit_all(manifests, tenant=tenant, labels=labels, params=params, execution=execution)[0]

    def submit_all(
        self,
        plan: Plan | RunManifest | list[RunManifest],
        *,
        tenant: str | None = None,
        labels: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        execution: str | None = None,
    ) -> list[RunHandle]:
        """Submit one run per variant of a plan (or per manifest given), with ``params``
        overriding the plan's run parameters (checked for every manifest before any is sent)
        and ``execution`` (``"stages"`` or ``"dag"``) the plan's ``execution:``."""
        manifests = plan if isinstance(plan, list) else self.manifests(plan)
        manifests = [with_params(m, params) for m in manifests]
        if execution is not None:
            if execution not in ("stages", "dag"):
                raise InvalidInputError(
                    f"execution is 'stages' or 'dag', not {execution!r}", path="execution"
                )
            manifests = [m.model_copy(update={"execution": execution}) for m in manifests]
        self.store.check()
        handles = []
        for m in manifests:
            handles.append(RunHandle(producer.submit(self.services, m, tenant=tenant, labels=labels), self))
            if self._fleet is not None:
                self._fleet.runs.append(handles[-1].run_id)  # cancelled if the fleet stops first
        return handles

    def execute(
        self,
        handler: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        tenant: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> TaskResult:
        """Run one task on the fleet and wait for it: a run of a single task.

        Example:
            >>> client.execute("shell", {"argv": ["echo", "hi"]}).output["stdout"]  # doctest: +SKIP
            'hi\\n'

        Args:
            handler: An allowed handler name (``shell``, ``http``, ``stub``, ``python:...``).
            params: Its params.
            timeout: The task's time limit, in seconds; the wait allows a minute more.
            retry: Its retry policy (default: one attempt).
            tenant: Recorded with the run.
            labels: Recorded with the run.

        Raises:
            PlanError: The handler is not allowed or the params are not a mapping.
            WaitTimeoutError: The task did not end in time (E002, also a ``TimeoutError``).
        """
        task = ManifestTask(
            id="task",
            stage=0,
            handler=handler,
            params=params or {},
            timeout=timeout,
            retry=retry or RetryPolicy(max_attempts=1),
        )
        if not self.settings.handler_allowed(handler):
            raise HandlerNotAllowedError(f"handler {handler!r} is not allowed here", path="handler")
        manifest = RunManifest(plan_id="execute", stages=[["task"]], tasks=[task])
        handle = self.submit(manifest, tenant=tenant, labels=labels)
        result = handle.wait(timeout=timeout * task.retry.max_attempts + 60)
        return result.tasks[0]

    def resolve_run(self, run_id: str) -> str:
        """The full id of a run given by its id or a unique prefix of at least 6 characters.

        Every method here taking a ``run_id`` accepts such a prefix too.

        Example:
            >>> client.resolve_run("3f9a2b")  # doctest: +SKIP
            '3f9a2b1c4d5e4f60a7b8c9d0e1f2a3b4'

        Raises:
            RunNotFoundError: No run has that id or prefix (E001).
            InvalidInputError: Several runs start with the prefix (E001, naming a few).
        """
        with self.store.begin() as s:
            return repo.resolve_run_id(s, run_id)

    def last_run(self, plan_id: str | None = None) -> str:
        """The id of the newest run (of the plan ``plan_id``, if given).

        Raises:
            RunNotFoundError: There is no run (of that plan) in the store (E001).
        """
        with self.store.begin() as s:
            found = repo.latest_run_id(s, plan_id)
        if found is None:
            of = f" of plan {plan_id!r}" if plan_id is not None else ""
            raise RunNotFoundError(f"no run{of} in the store", path="--last")
        return found

    def status(self, run_id: str) -> RunResult:
        """A run with its task results, as stored now (``run_id`` or a unique prefix)."""
        with self.store.begin() as s:
            return results.run_result(s, repo.resolve_run_id(s, run_id))

    def flow(self, run_id: str) -> FlowState:
        """A run's rate limits (tokens available, tasks waiting) and concurrency slots, now.

        Example:
            >>> for limit in client.flow(run_id).limits:  # doctest: +SKIP
            ...     print(limit.name, limit.tokens, limit.waiting)
            llm 3.5 12
        """
        with self.store.begin() as s:
            run = repo.get_run(s, repo.resolve_run_id(s, run_id))
            run_id = run.run_id
            manifest = repo.load_manifest(run)
            tenant = run.tenant
        limiter = RateLimiter(self.redis)
        limits = []
        for name, limit in sorted(manifest.rate_limits.items()):
            tokens, waiting = limiter.peek(bucket_key(name, limit, run_id=run_id, tenant=tenant), limit)
            limits.append(
                LimitState(
                    name=name,
                    scope=limit.scope,
                    per_minute=limit.per_minute,
                    burst=limit.burst,
                    tokens=round(max(0.0, tokens), 3),
                    waiting=waiting,
                    reserved=round(max(0.0, -tokens), 3),
                )
            )
        held = Slots(self.redis).held(slots_key(run_id)) if manifest.concurrency else 0
        return FlowState(limits=limits, concurrency=manifest.concurrency, running=held)

    def results(self, run_id: str) -> list[TaskResult]:
        """The task results of a run."""
        return self.status(run_id).tasks

    def logs(self, run_id: str, task_id: str | None = None, attempt: int | None = None) -> list[AttemptLog]:
        """The stored logs of a run's ended attempts (of one task, of one of its attempts),
        in the order they were stored: stdout and stderr of shell steps, the http handler's
        status line and body excerpt, tracebacks, ``ctx.logger`` lines; secrets masked.

        Example:
            >>> for entry in client.logs(run_id, "build"):  # doctest: +SKIP
            ...     print(entry.attempt, entry.stream, entry.text)
            1 stdout compiling...

        Raises:
            RunNotFoundError: No such run, or no task ``task_id`` in it (E001).
        """
        with self.store.begin() as s:
            return repo.attempt_logs(s, repo.resolve_run_id(s, run_id), task_id, attempt)

    def wait(self, run_id: str, timeout: float | None = None, poll: float = 0.2) -> RunResult:
        """Block until a run ends; its result then.

        Raises:
            WaitTimeoutError: The run had not ended after ``timeout`` seconds (E002; also a
                ``TimeoutError``, as Celery's ``AsyncResult.get`` raises); ``result`` holds it
                as it stood. The run goes on.
            WorkerLostError: This client's embedded fleet died meanwhile (E011).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        run_id = self.resolve_run(run_id)
        while True:
            with self.store.begin() as s:
                status = RunStatus(repo.get_run(s, run_id).status)
            if status.terminal:
                return self.status(run_id)
            if deadline is not None and time.monotonic() >= deadline:
                result = self.status(run_id)
                if result.status.terminal:
                    return result
                raise WaitTimeoutError(
                    f"run {run_id} is still {result.status.value} after {timeout:g} s "
                    f"({_ended_count(result)}); it goes on",
                    result=result,
                )
            if self._fleet is not None:
                self._fleet.check()
            time.sleep(poll)

    def cancel(self, run_id: str, *, by: str | None = None) -> RunStatus:
        """Cancel a run; it ends ``cancelled`` once no task of it runs any more.

        ``by`` (default ``user@host``) is recorded in the run's history.
        """
        return producer.cancel(self.services, self.resolve_run(run_id), by=_who(by))

    def approve(
        self,
        run_id: str,
        task_id: str,
        *,
        reject: bool = False,
        reason: str | None = None,
        by: str | None = None,
    ) -> TaskStatus:
        """Decide an approval gate: approve it (the task succeeds), or reject it (E012).

        Example:
            >>> client.approve(run_id, "go-live", by="ana", reason="staging is green")  # doctest: +SKIP
            <TaskStatus.SUCCEEDED: 'succeeded'>

        Raises:
            ConflictError: The task is not waiting for approval (any longer).
        """
        run_id = self.resolve_run(run_id)
        return producer.decide(self.services, run_id, task_id, approve=not reject, by=_who(by), reason=reason)

    def retry(self, run_id: str, tasks: list[str] | None = None, *, by: str | None = None) -> list[str]:
        """Run a run's failed (or the named) tasks again in the same run; the ids reopened.

        Succeeded tasks and their outputs are kept; what was skipped downstream runs too.

        Example:
            >>> client.retry(run_id)  # doctest: +SKIP
            ['deploy', 'smoke-test']
        """
        return producer.retry_run(self.services, self.resolve_run(run_id), tasks, by=_who(by))

    def resume(self, run_id: str, *, by: str | None = None) -> int:
        """Re-dispatch the unfinished part of a run from the store; tasks re-queued.

        ``by`` (default ``user@host``) is recorded in the run's history.
        """
        return producer.resume(self.services, self.resolve_run(run_id), by=_who(by))

    def runs(
        self,
        *,
        status: RunStatus | str | None = None,
        tenant: str | None = None,
        label: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[RunSummary]:
        """Runs, newest first, filtered by status, tenant or one label ``(key, value)``."""
        with self.store.begin() as s:
            return results.list_runs(
                s, status=RunStatus(status) if status else None, tenant=tenant, label=label, limit=limit
            )


def _who(by: str | None) -> str:
    """Who asks for an action: ``by``, else ``user@host``."""
    return by or f"{getpass.getuser()}@{socket.gethostname()}"


def _ended_count(result: RunResult) -> str:
    """``3/5 tasks ended`` for a run that goes on."""
    ended = sum(1 for t in result.tasks if t.status.terminal)
    return f"{ended}/{len(result.tasks)} tasks ended"
