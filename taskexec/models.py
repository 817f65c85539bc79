"""The data contract of taskexec: statuses, error codes, policies, manifests and results.

Every model here round-trips through JSON exactly
(``Model.model_validate_json(m.model_dump_json()) == m``); messages and manifests are
frozen. The plan *file* schema lives in :mod:`taskexec.plan`; this module holds what a
plan compiles to and what a run produces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "RUN_TRANSITIONS",
    "TASK_TRANSITIONS",
    "Change",
    "Criterion",
    "ErrorCode",
    "FlowState",
    "LimitState",
    "ManifestTask",
    "MatrixInfo",
    "Notify",
    "PathCriterion",
    "RateLimit",
    "RetryPolicy",
    "RunManifest",
    "RunResult",
    "RunStatistics",
    "RunStatus",
    "RunSummary",
    "StopConditions",
    "TaskResult",
    "TaskStatus",
    "ValidatorCriterion",
]


class ErrorCode(StrEnum):
    """Error codes of the execution model; the CLI prints them in every error."""

    VALIDATION = "E001"
    """Validation of input, plan or params."""
    TIMEOUT = "E002"
    """A task exceeded its timeout."""
    EXECUTION_ERROR = "E003"
    """A handler failed (non-zero exit, exception, 4xx)."""
    CANCELLED = "E004"
    """The task or run was cancelled."""
    RETRIES_EXHAUSTED = "E005"
    """A task failed on every allowed attempt."""
    DATABASE_ERROR = "E006"
    """The result store failed or is unreachable."""
    CRITERIA_ERROR = "E007"
    """An output criterion could not be evaluated."""
    CRITERIA_NOT_MET = "E008"
    """The output did not meet its criteria on any attempt."""
    UPSTREAM_FAILED = "E009"
    """An upstream task ended without success; this task was skipped."""
    HANDLER_NOT_ALLOWED = "E010"
    """The handler is unknown or not allowed by the operator."""
    WORKER_LOST = "E011"
    """The worker process running the task died."""
    APPROVAL_REJECTED = "E012"
    """An approval gate was rejected, or its timeout passed."""
    BROKER_UNAVAILABLE = "E013"
    """The broker (Redis) is unreachable."""


class TaskStatus(StrEnum):
    """Status of one atomic task of a run."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    VALIDATING = "validating"
    WAITING_APPROVAL = "waiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    VALIDATION_FAILED = "validation_failed"
    TIMED_OUT = "timed_out"
    ERROR = "error"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        """Whether the task has ended (only ``taskexec retry`` reopens a failure)."""
        return self in _TASK_ENDS

    @property
    def failure(self) -> bool:
        """Whether the task ended without success for a reason of its own."""
        return self in _TASK_FAILURES

    @property
    def active(self) -> bool:
        """Whether a message is on its way to the task or a worker is on it."""
        return self in _TASK_ACTIVE

    @property
    def unsettled(self) -> bool:
        """Whether the task is not over yet: active, or waiting for a person's decision."""
        return self in _TASK_ACTIVE or self is TaskStatus.WAITING_APPROVAL

    @property
    def blocking(self) -> bool:
        """Whether the task ended without success: what depends on it is skipped (E009)."""
        return self in _TASK_ENDS and self is not TaskStatus.SUCCEEDED

    def can_become(self, new: TaskStatus) -> bool:
        """Whether the state machine allows the change from this status to ``new``."""
        return new in TASK_TRANSITIONS[self]


_T = TaskStatus
_TASK_FAILURES = frozenset({_T.FAILED, _T.VALIDATION_FAILED, _T.TIMED_OUT, _T.ERROR})
_TASK_ENDS = frozenset({_T.SUCCEEDED, *_TASK_FAILURES, _T.CANCELLED, _T.SKIPPED})
_TASK_ACTIVE = frozenset({_T.QUEUED, _T.RUNNING, _T.RETRYING, _T.VALIDATING})
#: Ended without success and reopened by ``taskexec retry RUN`` (back to pending).
_RERUN = frozenset({_T.PENDING})

#: Allowed task transitions. Nothing moves a task backwards to re-send it: a lost message
#: is sent again with the task's status as it is (the outbox, the reconciler, ``resume``),
#: and the claim decides which copy runs it.
TASK_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    _T.PENDING: frozenset({_T.QUEUED, _T.CANCELLED, _T.SKIPPED}),
    _T.QUEUED: frozenset({_T.RUNNING, _T.CANCELLED, _T.SKIPPED, _T.ERROR, _T.FAILED}),
    _T.RUNNING: frozenset({_T.VALIDATING, _T.RETRYING, _T.WAITING_APPROVAL} | _TASK_ENDS - {_T.SKIPPED}),
    _T.RETRYING: frozenset({_T.QUEUED, _T.RUNNING, _T.CANCELLED, _T.ERROR, _T.FAILED}),
    _T.VALIDATING: frozenset({_T.SUCCEEDED, _T.VALIDATION_FAILED, _T.RETRYING, _T.ERROR, _T.CANCELLED}),
    # An approval gate: approved (succeeded), rejected or timed out (failed), or cancelled.
    _T.WAITING_APPROVAL: frozenset({_T.SUCCEEDED, _T.FAILED, _T.CANCELLED}),
    _T.SUCCEEDED: frozenset(),
    _T.FAILED: _RERUN,
    _T.VALIDATION_FAILED: _RERUN,
    _T.TIMED_OUT: _RERUN,
    _T.ERROR: _RERUN,
    _T.CANCELLED: _RERUN,
    _T.SKIPPED: _RERUN,
}


class RunStatus(StrEnum):
    """Status of a run (one variant of a plan)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    ERROR = "error"

    @property
    def terminal(self) -> bool:
        """Whether the run has ended."""
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)

    def can_become(self, new: RunStatus) -> bool:
        """Whether the run state machine allows the change from this status to ``new``."""
        return new in RUN_TRANSITIONS[self]


_R = RunStatus
_RUN_ENDS = frozenset({_R.SUCCEEDED, _R.FAILED, _R.CANCELLED, _R.TIMED_OUT, _R.ERROR})
#: Allowed run transitions. A run's end is final for everything automatic (the reconciler,
#: ``resume``, redeliveries); ``failed``, ``cancelled``, ``timed_out`` or ``error`` ->
#: ``running`` is ``taskexec retry``, a person's decision to run failed tasks again.
RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    _R.QUEUED: frozenset({_R.RUNNING} | _RUN_ENDS),
    _R.RUNNING: _RUN_ENDS,
    _R.ERROR: frozenset({_R.RUNNING}),
    _R.SUCCEEDED: frozenset(),
    _R.FAILED: frozenset({_R.RUNNING}),
    _R.CANCELLED: frozenset({_R.RUNNING}),
    _R.TIMED_OUT: frozenset({_R.RUNNING}),
}


@dataclass(frozen=True)
class Change:
    """A status change that happened, committed: published as a run event afterwards.

    The store's writes return these (one per row that moved); the run's code publishes
    them on the run's event channel once the transaction committed.
    """

    run_id: str
    task_id: str | None
    status: str
    attempt: int = 0
    error_code: str | None = None
    message: str | None = None
    #: Structured details for consumers of events (a throttled wait's limit and seconds).
    data: dict[str, Any] | None = None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetryPolicy(_Frozen):
    """How often and how far apart a failing task is tried again."""

    max_attempts: int = Field(3, ge=1, le=100, description="attempts in total, the first included")
    backoff: float = Field(1.0, ge=0, le=86_400, description="seconds before the first retry")
    multiplier: float = Field(2.0, ge=1, le=100, description="growth of the delay per retry")
    max_backoff: float = Field(60.0, ge=0, le=86_400, description="cap of one delay, seconds")
    jitter: bool = Field(True, description="full jitter: a uniform delay in [0, computed delay]")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one.

        >>> RetryPolicy(backoff=1, multiplier=2, jitter=False).delay(3)
        4.0
        """
        base = min(self.max_backoff, self.backoff * self.multiplier ** max(0, attempt - 1))
        if self.jitter:
            return (rng or random).uniform(0, base)
        return float(base)


class RateLimit(_Frozen):
    """A fleet-wide token bucket: ``per_minute`` tokens refill, at most ``burst`` saved."""

    per_minute: float = Field(gt=0, le=1_000_000)
    burst: int = Field(1, ge=1, le=1_000_000)
    scope: Literal["run", "global", "tenant"] = "run"


class StopConditions(_Frozen):
    """When a run stops early: after ``max_failures`` failed tasks or ``timeout`` seconds."""

    max_failures: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)


class PathCriterion(_Frozen):
    """A check of one value in the output: ``{path: score, op: ">=", value: 0.8}``."""

    path: str = Field(min_length=1)
    op: Literal["exists", "==", "!=", ">", ">=", "<", "<=", "in", "not_in", "regex"]
    value: Any = None


class ValidatorCriterion(_Frozen):
    """A registered validator handler that judges the output: ``{validator: name, params: {}}``."""

    validator: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


Criterion = PathCriterion | ValidatorCriterion


NotifyEvent = Literal["run_finished", "task_failed"]


def _run_finished() -> list[NotifyEvent]:
    return ["run_finished"]


class Notify(_Frozen):
    """A webhook: taskexec POSTs a JSON event to ``url`` for each of ``events``."""

    url: str = Field(pattern=r"^https?://", max_length=2000)
    events: list[NotifyEvent] = Field(default_factory=_run_finished, min_length=1)


class ManifestTask(_Frozen):
    """One atomic task of a run manifest, with its resolved policy."""

    id: str
    stage: int = Field(ge=0)
    depends_on: list[str] = Field(default_factory=list)
    handler: str
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list)
    output: str | None = None
    timeout: float = Field(60.0, gt=0)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    rate_limit: str | None = None
    priority: int = Field(5, ge=0, le=9)
    validate_: list[Criterion] = Field(default_factory=list, alias="validate")
    secret_params: list[str] = Field(default_factory=list)
    source: str = Field("", description="where the task stands in the plan, e.g. tasks[1].tasks[0]")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True)


class MatrixInfo(_Frozen):
    """How one matrix task expanded: cases kept against the full cartesian product."""

    task: str
    strategy: Literal["pairwise", "cartesian", "scenario_only"]
    cases: int
    cartesian: int
    cases_needed: int = 0
    """Cases a full pairwise suite has: more than ``cases`` when ``max_cases`` cut it."""
    pairs_total: int = 0
    """Pairwise: the reachable value t-tuples (pairs at strength 2)."""
    pairs_covered: int = 0
    truncated: bool = False
    strength: int | None = None
    """Pairwise: the t of the t-tuples covered (at most the number of parameters)."""
    effort: Literal["fast", "balanced", "thorough"] | None = None
    """Pairwise: the effort the suite was shrunk with."""
    lower_bound: int = 0
    """Pairwise: the fewest cases any full suite can have (the most tuples of any t parameters)."""


class RunManifest(_Frozen):
    """One variant of a compiled plan: atomic tasks in dependency stages."""

    plan_id: str
    plan_name: str | None = None
    variant: str = "default"
    stages: list[list[str]]
    tasks: list[ManifestTask]
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    stop: StopConditions = Field(default_factory=StopConditions)
    concurrency: int | None = Field(None, ge=1, description="tasks of the run executing at once, fleet-wide")
    notify: list[Notify] = Field(default_factory=list)
    matrices: list[MatrixInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stages_match_tasks(self) -> RunManifest:
        staged = [t for stage in self.stages for t in stage]
        if sorted(staged) != sorted(t.id for t in self.tasks):
            raise ValueError("stages must list every task exactly once")
        return self

    def task(self, task_id: str) -> ManifestTask:
        """The task with id ``task_id``; ``KeyError`` when there is none."""
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise KeyError(task_id)


class TaskResult(_Frozen):
    """The outcome of one task of a run, as stored."""

    id: str
    stage: int = 0
    status: TaskStatus
    attempts: int = 0
    throttled: int = Field(0, description="times the task waited for a rate-limit token or a slot")
    error_code: ErrorCode | None = None
    error_message: str | None = None
    output: Any = None
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class RunStatistics(_Frozen):
    """Counts of a run's tasks by outcome, retries and wall time."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    validation_failed: int = 0
    timed_out: int = 0
    error: int = 0
    cancelled: int = 0
    skipped: int = 0
    pending: int = 0
    running: int = 0
    waiting_approval: int = 0
    retries: int = 0
    throttled: int = 0
    duration_seconds: float | None = None

    @classmethod
    def of(cls, tasks: list[TaskResult], duration_seconds: float | None) -> RunStatistics:
        """Statistics of a list of task results."""
        counts: dict[str, int] = {}
        for t in tasks:
            counts[t.status.value] = counts.get(t.status.value, 0) + 1
        active = (_T.QUEUED, _T.RUNNING, _T.RETRYING, _T.VALIDATING)
        return cls(
            total=len(tasks),
            succeeded=counts.get("succeeded", 0),
            failed=counts.get("failed", 0),
            validation_failed=counts.get("validation_failed", 0),
            timed_out=counts.get("timed_out", 0),
            error=counts.get("error", 0),
            cancelled=counts.get("cancelled", 0),
            skipped=counts.get("skipped", 0),
            pending=counts.get("pending", 0),
            waiting_approval=counts.get("waiting_approval", 0),
            running=sum(counts.get(s.value, 0) for s in active),
            retries=sum(max(0, t.attempts - 1) for t in tasks),
            throttled=sum(t.throttled for t in tasks),
            duration_seconds=duration_seconds,
        )


class LimitState(_Frozen):
    """A rate limit as a run sees it now: tokens in its bucket and tasks waiting for one."""

    name: str
    scope: Literal["run", "global", "tenant"]
    per_minute: float
    burst: int
    #: Tokens a task asking now would find (0 while tasks wait in line).
    tokens: float
    #: Tasks (of any run sharing the bucket) waiting in line for a token.
    waiting: int
    #: Tokens promised to the waiting tasks, refilled at the rate before newcomers get any.
    reserved: float = 0.0


class FlowState(_Frozen):
    """A run's flow control now: its rate limits and its concurrency slots."""

    limits: list[LimitState] = Field(default_factory=list)
    concurrency: int | None = None
    running: int = 0


class RunSummary(_Frozen):
    """One line of ``taskexec runs``: a run without its task results."""

    run_id: str
    plan_id: str
    variant: str
    status: RunStatus
    statistics: RunStatistics
    submitted_at: datetime
    finished_at: datetime | None = None
    tenant: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class RunResult(RunSummary):
    """A run with the results of all its tasks, in stage order."""

    error_message: str | None = None
    tasks: list[TaskResult] = Field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        """Whether the run ended ``succeeded``."""
        return self.status is RunStatus.SUCCEEDED
