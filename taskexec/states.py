"""The state machines: task and run statuses, the transitions allowed between them, the
status groups (active, unsettled, blocking, terminal), error codes, and :class:`Change`,
a committed status change published as a run event.

Example:
    >>> TaskStatus.RETRYING.active, TaskStatus.WAITING_APPROVAL.unsettled
    (True, True)
    >>> RunStatus.SUCCEEDED.can_become(RunStatus.RUNNING)
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["RUN_TRANSITIONS", "TASK_TRANSITIONS", "Change", "ErrorCode", "RunStatus", "TaskStatus"]


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
