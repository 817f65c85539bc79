"""taskexec: plan-driven job execution on a Celery worker fleet.

Example:
    >>> import taskexec
    >>> plan = taskexec.parse_plan("tasks: [{id: hello, handler: stub}]")
    >>> [manifest] = taskexec.compile_plan(plan)
    >>> manifest.stages
    [['hello']]
"""

from taskexec.client import Client, RunHandle
from taskexec.errors import (
    AwaitApproval,
    BrokerUnavailableError,
    ControlSignal,
    CriteriaError,
    DatabaseUnavailableError,
    DependencyCycleError,
    DestinationNotAllowedError,
    HandlerNotAllowedError,
    IllegalTransitionError,
    ParamsError,
    PlanError,
    RetryableError,
    RunNotFoundError,
    ServiceUnavailableError,
    TaskCancelled,
    TaskexecError,
    TaskFailed,
    Throttled,
    WaitTimeoutError,
    WorkerLostError,
)
from taskexec.handlers import HandlerContext, handler, validator
from taskexec.models import (
    AttemptLog,
    ErrorCode,
    FlowState,
    LimitState,
    ManifestTask,
    Notify,
    RateLimit,
    RetryPolicy,
    RunManifest,
    RunResult,
    RunStatistics,
    RunStatus,
    RunSummary,
    StopConditions,
    TaskResult,
    TaskStatus,
)
from taskexec.plan import Plan, PlanTask, load_plan, parse_plan
from taskexec.plan.compiler import compile_plan
from taskexec.settings import Settings

__version__ = "0.1.0"

__all__ = [
    # plans and manifests
    "ManifestTask",
    "Plan",
    "PlanTask",
    "RunManifest",
    "compile_plan",
    "load_plan",
    "parse_plan",
    # submitting and reading runs
    "Client",
    "RunHandle",
    # handlers and validators (worker side)
    "HandlerContext",
    "handler",
    "validator",
    # policies
    "Notify",
    "RateLimit",
    "RetryPolicy",
    "StopConditions",
    # results and statuses
    "AttemptLog",
    "ErrorCode",
    "FlowState",
    "LimitState",
    "RunResult",
    "RunStatistics",
    "RunStatus",
    "RunSummary",
    "TaskResult",
    "TaskStatus",
    # configuration
    "Settings",
    # errors
    "BrokerUnavailableError",
    "CriteriaError",
    "DatabaseUnavailableError",
    "DependencyCycleError",
    "DestinationNotAllowedError",
    "HandlerNotAllowedError",
    "IllegalTransitionError",
    "ParamsError",
    "PlanError",
    "RunNotFoundError",
    "ServiceUnavailableError",
    "TaskFailed",
    "TaskexecError",
    "WaitTimeoutError",
    "WorkerLostError",
    # control signals (raised by handlers, not failures)
    "AwaitApproval",
    "ControlSignal",
    "RetryableError",
    "TaskCancelled",
    "Throttled",
]
