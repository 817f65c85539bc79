"""The data contract of taskexec: policies, manifests and results (statuses and error codes
are :mod:`taskexec.states`, re-exported here).

Every model here round-trips through JSON exactly
(``Model.model_validate_json(m.model_dump_json()) == m``); messages and manifests are
frozen. The plan *file* schema lives in :mod:`taskexec.plan`; this module holds what a
plan compiles to and what a run produces.
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from taskexec.states import RUN_TRANSITIONS, TASK_TRANSITIONS, Change, ErrorCode, RunStatus, TaskStatus

__all__ = [
    "RUN_TRANSITIONS",
    "TASK_TRANSITIONS",
    "AttemptLog",
    "Change",
    "Criterion",
    "ErrorCode",
    "FlowState",
    "InputRef",
    "LimitState",
    "ManifestTask",
    "MatrixInfo",
    "Notify",
    "ParamSpec",
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


def _is_none(value: Any) -> bool:
    return value is None


def _is_empty(value: Any) -> bool:
    return not value


#: A run parameter's declared type -> the Python types its values may have.
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list,),
    "object": (dict,),
}


class ParamSpec(_Frozen):
    """A run parameter a plan declares: its type and default (none: the submitter must give it)."""

    type: Literal["string", "int", "float", "bool", "list", "object"] | None = None
    default: Any = None
    required: bool = False
    description: str | None = Field(None, exclude_if=_is_none)


class InputRef(_Frozen):
    """An input that selects part of an upstream artifact and may rename it.

    ``{from: scores, path: json.items, as: items}``: the handler gets ``items``, the value at
    ``json.items`` of the ``scores`` artifact (of every case's output, for a matrix task's).
    """

    from_: str = Field(alias="from", min_length=1)
    path: str | None = Field(None, min_length=1)
    as_: str | None = Field(None, alias="as", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True)

    @property
    def name(self) -> str:
        """The name the handler receives the value under."""
        return self.as_ or self.from_


def artifact_of(entry: str | InputRef) -> str:
    """The upstream artifact an ``inputs`` entry reads."""
    return entry if isinstance(entry, str) else entry.from_


def input_name(entry: str | InputRef) -> str:
    """The name under which an ``inputs`` entry reaches the handler."""
    return entry if isinstance(entry, str) else entry.name


class ManifestTask(_Frozen):
    """One atomic task of a run manifest, with its resolved policy."""

    id: str
    stage: int = Field(ge=0)
    depends_on: list[str] = Field(default_factory=list)
    handler: str
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: list[str | InputRef] = Field(default_factory=list)
    output: str | None = None
    timeout: float = Field(60.0, gt=0)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    rate_limit: str | None = None
    priority: int = Field(5, ge=0, le=9)
    validate_: list[Criterion] = Field(default_factory=list, alias="validate")
    secret_params: list[str] = Field(default_factory=list)
    source: str = Field("", description="where the task stands in the plan, e.g. tasks[1].tasks[0]")
    case: dict[str, Any] | None = Field(
        None,
        exclude_if=_is_none,
        description="a matrix case's values (merged into params too); left out of the JSON without a matrix",
    )

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
    #: The run parameters the plan declares (``params:``).
    params: dict[str, ParamSpec] = Field(default_factory=dict, exclude_if=_is_empty)
    #: Their values for this run: the defaults, with the submitter's overrides applied.
    param_values: dict[str, Any] = Field(default_factory=dict, exclude_if=_is_empty)
    #: How tasks are released: ``stages`` (one stage after another, a barrier between) or
    #: ``dag`` (each task as soon as its own upstream tasks have ended).
    execution: Literal["stages", "dag"] = "stages"

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
    case: dict[str, Any] | None = Field(
        None, description="the matrix case's values (parameter name to value); None outside a matrix"
    )
    params: dict[str, Any] | None = Field(
        None, description="the handler params of the latest attempt as rendered (templates filled in)"
    )
    error_code: ErrorCode | None = None
    error_message: str | None = None
    output: Any = None
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    execution_seconds: float | None = Field(
        None,
        description="time the handler ran, summed over the attempts (pauses between them left out); "
        "for a running task, its current attempt so far",
    )
    wall_seconds: float | None = Field(
        None,
        description="first start to end, retries and their pauses included; for a task not yet "
        "ended (running, waiting), the time elapsed since it started",
    )


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
        return cls.counted(
            counts,
            retries=sum(max(0, t.attempts - 1) for t in tasks),
            throttled=sum(t.throttled for t in tasks),
            duration_seconds=duration_seconds,
        )

    @classmethod
    def counted(
        cls, counts: dict[str, int], *, retries: int, throttled: int, duration_seconds: float | None
    ) -> RunStatistics:
        """Statistics from the number of tasks in each status (as a database counts them)."""
        return cls(
            total=sum(counts.values()),
            succeeded=counts.get("succeeded", 0),
            failed=counts.get("failed", 0),
            validation_failed=counts.get("validation_failed", 0),
            timed_out=counts.get("timed_out", 0),
            error=counts.get("error", 0),
            cancelled=counts.get("cancelled", 0),
            skipped=counts.get("skipped", 0),
            pending=counts.get("pending", 0),
            waiting_approval=counts.get("waiting_approval", 0),
            running=sum(n for s, n in counts.items() if TaskStatus(s).active),
            retries=retries,
            throttled=throttled,
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

    #: The run's parameters (the plan's ``params:`` with the submitter's overrides).
    params: dict[str, Any] = Field(default_factory=dict)
    error_message: str | None = None
    tasks: list[TaskResult] = Field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        """Whether the run ended ``succeeded``."""
        return self.status is RunStatus.SUCCEEDED


class AttemptLog(_Frozen):
    """One stream of what an attempt of a task printed or logged, secrets masked.

    ``stream`` is ``stdout`` or ``stderr`` (a shell step), ``http`` (the status line and a
    body excerpt), ``error`` (the exception the handler raised, with its traceback) or
    ``log`` (what the handler logged through ``ctx.logger``). An attempt keeps at most
    ``TASKEXEC_MAX_LOG_BYTES`` of them together: a cut stream is ``truncated`` and its text
    ends with ``… [truncated: 3.2 MiB more]``. ``at`` is when the stream began.
    """

    run_id: str
    task_id: str
    attempt: int = Field(ge=1)
    stream: str
    text: str
    truncated: bool = False
    at: datetime
