"""One rooted error tree for taskexec; every class maps to one E0xx code.

::

    TaskexecError
    ├── InvalidInputError          E001  an argument, a setting or a request is invalid (names it)
    │   ├── PlanError              E001  a plan is invalid (names the field path)
    │   │   └── DependencyCycleError E001  the dependencies of a plan form a cycle
    │   └── ConflictError          E001  the request came too late: the state changed meanwhile
    ├── HandlerNotAllowedError     E010  a handler is unknown or not allowed by the operator
    ├── CriteriaError              E007  an output criterion could not be evaluated
    ├── IllegalTransitionError     E003  a status change the state machine forbids
    ├── RunNotFoundError           E001  no run with that id in the store
    ├── WaitTimeoutError           E002  a wait for a run timed out before the run ended
    ├── ServiceUnavailableError          a service cannot be reached (CLI exit 3)
    │   ├── DatabaseUnavailableError E006
    │   ├── BrokerUnavailableError   E013
    │   └── WorkerLostError          E011  the embedded worker died during a run
    ├── TaskFailed                 E003  a handler failed for good: no retry
    │   └── ParamsError            E001  a task's params are invalid for its handler
    │       └── DestinationNotAllowedError E001  a URL reaches an address the operator does not allow
    └── ControlSignal                    control flow, not failures
        ├── RetryableError         E003  a handler asks to be retried with backoff
        ├── TaskCancelled          E004  the run was cancelled while the task ran
        ├── AwaitApproval          E012  the task waits for a person's decision (approval gate)
        └── Throttled              E003  a task waits (token, slot, lease): re-queued, no attempt spent

Handler authors raise :class:`TaskFailed` or :class:`RetryableError`; any other
exception a handler raises counts as an execution error and is retried.
"""

from __future__ import annotations

from taskexec.models import ErrorCode

__all__ = [
    "AwaitApproval",
    "BrokerUnavailableError",
    "ConflictError",
    "ControlSignal",
    "CriteriaError",
    "DatabaseUnavailableError",
    "DependencyCycleError",
    "DestinationNotAllowedError",
    "HandlerNotAllowedError",
    "IllegalTransitionError",
    "InvalidInputError",
    "ParamsError",
    "PlanError",
    "RetryableError",
    "RunNotFoundError",
    "ServiceUnavailableError",
    "TaskCancelled",
    "TaskFailed",
    "TaskexecError",
    "Throttled",
    "WaitTimeoutError",
    "WorkerLostError",
]


#: The most errors of one plan that are reported together (``taskexec validate`` lists them).
MAX_ERRORS = 50


class TaskexecError(Exception):
    """Root of every error taskexec raises on purpose.

    One error may carry others found with it (a plan's every error, say): ``errors`` lists
    them all, this one first, at most :data:`MAX_ERRORS`; ``str()`` is the first one's line
    and how many more there are.
    """

    code: ErrorCode = ErrorCode.EXECUTION_ERROR

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.others: list[TaskexecError] = []
        self.omitted = 0  # errors found beyond MAX_ERRORS, counted only

    @property
    def errors(self) -> list[TaskexecError]:
        """This error and the others found with it, in the order found."""
        return [self, *self.others]

    @property
    def more(self) -> int:
        """How many errors were found besides this one (listed or not)."""
        return len(self.others) + self.omitted

    def line(self) -> str:
        """This error alone, one line: ``E001 tasks[1].timeout: must be greater than 0``."""
        where = f" {self.path}" if self.path else ""
        return f"{self.code.value}{where}: {self.message}"

    def __str__(self) -> str:
        return self.line() + (f" (and {self.more} more errors)" if self.more else "")

    @staticmethod
    def gathered(errors: list[TaskexecError], total: int | None = None) -> TaskexecError:
        """The first of ``errors`` carrying the rest (at most :data:`MAX_ERRORS` in all);
        ``total`` counts errors found but not built."""
        first = errors[0]
        first.others = errors[1:MAX_ERRORS]
        first.omitted = max(len(errors), total or 0) - 1 - len(first.others)
        return first


class InvalidInputError(TaskexecError):
    """A command argument, a ``TASKEXEC_*`` setting or a request is invalid; ``path`` names it."""

    code = ErrorCode.VALIDATION


class PlanError(InvalidInputError):
    """A plan or a plan file is invalid; ``path`` is the field (``tasks[1].depends_on[0]``)."""


class ConflictError(InvalidInputError):
    """The request came too late: what it acts on changed meanwhile (decided, ended, moved on)."""


class DependencyCycleError(PlanError):
    """The dependencies of a plan form a cycle; ``cycle`` lists it, first id repeated last."""

    def __init__(self, cycle: list[str], *, path: str | None = None) -> None:
        super().__init__("dependency cycle: " + " -> ".join(cycle), path=path)
        self.cycle = cycle


class HandlerNotAllowedError(TaskexecError):
    """A handler is unknown, or the operator does not allow it."""

    code = ErrorCode.HANDLER_NOT_ALLOWED


class CriteriaError(TaskexecError):
    """An output criterion could not be evaluated (bad path, bad operand types)."""

    code = ErrorCode.CRITERIA_ERROR


class IllegalTransitionError(TaskexecError):
    """A status change that the task or run state machine forbids."""

    code = ErrorCode.EXECUTION_ERROR


class RunNotFoundError(TaskexecError):
    """No run with the given id exists in the store."""

    code = ErrorCode.VALIDATION


class ServiceUnavailableError(TaskexecError):
    """A service taskexec needs (broker, database) cannot be reached."""


class DatabaseUnavailableError(ServiceUnavailableError):
    """The result store cannot be reached or refused the operation."""

    code = ErrorCode.DATABASE_ERROR


class BrokerUnavailableError(ServiceUnavailableError):
    """The Celery broker or the Redis server cannot be reached."""

    code = ErrorCode.BROKER_UNAVAILABLE


class WorkerLostError(ServiceUnavailableError):
    """The embedded Celery worker died while runs were in progress."""

    code = ErrorCode.WORKER_LOST


class TaskFailed(TaskexecError):
    """Raised by a handler: the task failed for good and must not be retried."""

    code = ErrorCode.EXECUTION_ERROR


class ParamsError(TaskFailed):
    """A task's params are invalid for its handler: retrying cannot help."""

    code = ErrorCode.VALIDATION


class DestinationNotAllowedError(ParamsError):
    """A URL resolves to a loopback, private, link-local or metadata address the operator does not allow."""


class ControlSignal(TaskexecError):
    """Base of control-flow signals: they steer execution and are not failures."""


class RetryableError(ControlSignal):
    """Raised by a handler: the attempt failed, retry it with backoff while attempts remain."""

    code = ErrorCode.EXECUTION_ERROR


class TaskCancelled(ControlSignal):
    """The run of the task was cancelled while the task was running."""

    code = ErrorCode.CANCELLED


class AwaitApproval(ControlSignal):
    """Raised by the ``approval`` handler: the task waits for a decision, holding no worker.

    ``timeout`` (seconds, optional) rejects it when no decision came in time.
    """

    code = ErrorCode.APPROVAL_REJECTED

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


class Throttled(ControlSignal):
    """A task waits for a rate-limit token, a concurrency slot or another copy's lease.

    Shown as the reason of the Celery retry (in logs and Flower); it spends no attempt.
    """

    code = ErrorCode.EXECUTION_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message or "waiting")


class WaitTimeoutError(TaskexecError, TimeoutError):
    """A run had not ended when a wait for it timed out (``RunHandle.wait(timeout=...)``).

    Also a :class:`TimeoutError`, as Celery's ``AsyncResult.get(timeout=...)`` raises.
    ``result`` is the run as it stood then; the run goes on.
    """

    code = ErrorCode.TIMEOUT

    def __init__(self, message: str, *, result: object = None) -> None:
        super().__init__(message, path="timeout")
        self.result = result
