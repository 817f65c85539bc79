"""What the dashboard shows and does, shared by its HTML pages and its JSON API.

Reads go through :mod:`taskexec.store.dashboard` (bounded queries) and
:mod:`taskexec.store.results`; every read takes the asker's :class:`Access` and sees only
its tenant's runs. Actions go through :class:`taskexec.Client`, the same calls the CLI
makes (``cancel``, ``retry``, ``resume``, ``approve``), with who did it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis import RedisError

from taskexec.client import Client
from taskexec.errors import InvalidInputError, ServiceUnavailableError
from taskexec.models import AttemptLog, FlowState, ManifestTask, RunManifest, RunSummary, TaskResult
from taskexec.run.messages import message_id
from taskexec.services import Services
from taskexec.settings import Settings
from taskexec.store import Store, results
from taskexec.store import dashboard as q
from taskexec.store import repository as repo
from taskexec.store.manifests import compiled_run
from taskexec.ui.security import Access

__all__ = ["Board", "RunView", "TaskView"]

#: Runs with more tasks than this are drawn as one node per stage (and matrix).
GRAPH_MAX_NODES = 300


@dataclass
class RunView:
    """A run page's data: the summary and what the store holds of its course."""

    summary: RunSummary
    plan_name: str | None
    params: dict[str, Any] | None
    stages: dict[int, dict[str, int]]
    started_at: datetime | None
    error_message: str | None
    stop_reason: str | None
    stage_count: int
    epoch: int
    flow: FlowState | None = None


@dataclass
class TaskView:
    """A task drawer's data: its result, attempts, definition and where its inputs came from."""

    run_id: str
    result: TaskResult
    definition: ManifestTask | None
    attempts: list[q.Attempt]
    producers: dict[str, list[str]] = field(default_factory=dict)
    flower: str | None = None
    #: Per attempt, what it printed or logged (``taskexec logs``), secrets masked.
    logs: dict[int, list[AttemptLog]] = field(default_factory=dict)


class Board:
    """The dashboard's reads and actions over one fleet's services (or a store alone).

    Args:
        settings: The configuration (``TASKEXEC_FLOWER_URL`` for links to Flower).
        store: The result store.
        client: How actions are taken: ``None`` when there is no fleet to act on.
    """

    def __init__(self, settings: Settings, store: Store, client: Client | None) -> None:
        self.settings = settings
        self.store = store
        self.client = client

    @classmethod
    def of(cls, services: Services) -> Board:
        """A board over given services (an embedded fleet's, say); the client it makes
        shares their app and store and is closed with :meth:`close`."""
        return cls(
            services.settings,
            services.store,
            Client(services.settings, app=services.app, store=services.store),
        )

    @property
    def can_act(self) -> bool:
        """Whether there is a fleet to send actions to."""
        return self.client is not None

    def close(self) -> None:
        """Close the client (its Redis connection); the services stay with their owner."""
        if self.client is not None:
            self.client.close()

    # ---- reads ----

    def resolve(self, access: Access, ref: str) -> str:
        """A run id (or unique prefix) the asker may see; :class:`RunNotFoundError` otherwise."""
        with self.store.begin() as s:
            run_id = repo.resolve_run_id(s, ref)
            q.run_row(s, run_id, access.tenant)
        return run_id

    def runs(
        self, access: Access, where: q.RunFilter, *, cursor: str | None = None, limit: int = 50
    ) -> tuple[q.RunsPage, dict[str, int]]:
        """A page of runs and the counts by status, within the asker's tenant."""
        if access.tenant is not None:
            where = q.RunFilter(
                where.status, where.plan, access.tenant, where.label, where.since, where.until
            )
        with self.store.begin() as s:
            return q.runs_page(s, where, cursor=cursor, limit=limit), q.status_counts(s, where)

    def run(self, access: Access, ref: str, *, flow: bool = False) -> RunView:
        """A run's page data."""
        run_id = self.resolve(access, ref)
        with self.store.begin() as s:
            row = q.run_row(s, run_id, access.tenant)
            summary = q.run_summary(s, row)
            view = RunView(
                summary=summary,
                plan_name=row.plan_name,
                params=row.params,
                stages=q.stage_counts(s, run_id),
                started_at=row.started_at,
                error_message=row.error_message,
                stop_reason=row.stop_reason,
                stage_count=row.stage_count,
                epoch=row.epoch,
            )
        if flow and self.client is not None and not summary.status.terminal:
            with contextlib.suppress(RedisError, OSError, ServiceUnavailableError):
                view.flow = self.client.flow(run_id)
        return view

    def manifest(self, access: Access, run_id: str) -> RunManifest:
        """A run's manifest (parsed once per process)."""
        with self.store.begin() as s:
            q.run_row(s, run_id, access.tenant)
            return compiled_run(s, run_id).manifest

    def tasks(
        self,
        access: Access,
        run_id: str,
        *,
        status: str | None = None,
        search: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> q.TasksPage:
        """A page of a run's tasks."""
        with self.store.begin() as s:
            q.run_row(s, run_id, access.tenant)
            return q.tasks_page(s, run_id, status=status, search=search, offset=offset, limit=limit)

    def task(self, access: Access, run_id: str, task_id: str) -> TaskView:
        """A task's drawer data."""
        with self.store.begin() as s:
            run = q.run_row(s, run_id, access.tenant)
            result = results.task_result(s, run_id, task_id)
            compiled = compiled_run(s, run_id)
            attempts = q.attempts(s, run_id, task_id)
            logs: dict[int, list[AttemptLog]] = {}
            for entry in repo.attempt_logs(s, run_id, task_id):
                logs.setdefault(entry.attempt, []).append(entry)
            epoch = run.epoch
        definition = compiled.tasks.get(task_id)
        names = [i if isinstance(i, str) else i.from_ for i in (definition.inputs if definition else [])]
        producers = {a: compiled.producers.get(a, []) for a in names}
        flower = None
        if self.settings.flower_url:
            flower = f"{self.settings.flower_url.rstrip('/')}/task/{message_id(run_id, task_id, epoch)}"
        return TaskView(run_id, result, definition, attempts, producers, flower, logs)

    def logs(self, access: Access, run_id: str, task_id: str, attempt: int | None = None) -> list[AttemptLog]:
        """What a task's attempts (or one of them) printed or logged, as ``taskexec logs`` shows it."""
        with self.store.begin() as s:
            q.run_row(s, run_id, access.tenant)
            return repo.attempt_logs(s, run_id, task_id, attempt)

    def timeline(self, access: Access, run_id: str, *, limit: int = 2000) -> tuple[list[q.Bar], bool]:
        """A run's attempts and waits as bars."""
        with self.store.begin() as s:
            q.run_row(s, run_id, access.tenant)
            return q.timeline(s, run_id, limit=limit)

    def history(
        self, access: Access, run_id: str, *, task_id: str | None = None, after: int = 0, limit: int = 200
    ) -> list[q.HistoryLine]:
        """A run's history (transitions, decisions, actions)."""
        with self.store.begin() as s:
            q.run_row(s, run_id, access.tenant)
            return q.history(s, run_id, task_id=task_id, after=after, limit=limit)

    def graph_rows(self, access: Access, run_id: str) -> list[q.TaskRow] | None:
        """Every task of the run for the graph, or ``None`` when there are too many to draw."""
        with self.store.begin() as s:
            q.run_row(s, run_id, access.tenant)
            page = q.tasks_page(s, run_id, limit=GRAPH_MAX_NODES)
        return page.tasks if page.total <= GRAPH_MAX_NODES else None

    def approvals(self, access: Access) -> list[q.WaitingGate]:
        """Every gate waiting, within the asker's tenant."""
        with self.store.begin() as s:
            return q.waiting_gates(s, access.tenant)

    # ---- actions: the Client's calls, as the CLI makes them ----

    def _client(self) -> Client:
        if self.client is None:
            raise InvalidInputError(
                "no fleet to act on: set TASKEXEC_BROKER_URL, or start an embedded `taskexec run`",
                path="TASKEXEC_BROKER_URL",
            )
        return self.client

    def cancel(self, access: Access, ref: str) -> str:
        """Cancel a run; its status after the call."""
        run_id = self.resolve(access, ref)
        return self._client().cancel(run_id, by=access.who).value

    def retry(self, access: Access, ref: str, tasks: list[str] | None = None) -> list[str]:
        """Run a run's failed (or the named) tasks again; the ids reopened."""
        run_id = self.resolve(access, ref)
        return self._client().retry(run_id, tasks, by=access.who)

    def resume(self, access: Access, ref: str) -> int:
        """Re-dispatch what may have lost its messages; how many tasks were sent again."""
        run_id = self.resolve(access, ref)
        return self._client().resume(run_id, by=access.who)

    def approve(self, access: Access, ref: str, task_id: str, *, reject: bool, reason: str | None) -> str:
        """Decide an approval gate; the task's status after it."""
        run_id = self.resolve(access, ref)
        return self._client().approve(run_id, task_id, reject=reject, reason=reason, by=access.who).value
