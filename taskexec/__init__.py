"""taskexec: plan-driven job execution on a Celery worker fleet.

Example:
    >>> import taskexec
    >>> plan = taskexec.parse_plan("tasks: [{id: hello, handler: stub}]")
    >>> [manifest] = taskexec.compile_plan(plan)
    >>> manifest.stages
    [['hello']]
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
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

#: Where each name lives: imported on first use, so that ``import taskexec.cli`` (``taskexec
#: --help``, ``validate``) pays for pydantic at most, never for Celery, kombu, Redis or
#: SQLAlchemy, which the client brings.
_LAZY: dict[str, str] = {
    "AwaitApproval": "taskexec.errors",
    "BrokerUnavailableError": "taskexec.errors",
    "ControlSignal": "taskexec.errors",
    "CriteriaError": "taskexec.errors",
    "DatabaseUnavailableError": "taskexec.errors",
    "DependencyCycleError": "taskexec.errors",
    "DestinationNotAllowedError": "taskexec.errors",
    "HandlerNotAllowedError": "taskexec.errors",
    "IllegalTransitionError": "taskexec.errors",
    "ParamsError": "taskexec.errors",
    "PlanError": "taskexec.errors",
    "RetryableError": "taskexec.errors",
    "RunNotFoundError": "taskexec.errors",
    "ServiceUnavailableError": "taskexec.errors",
    "TaskCancelled": "taskexec.errors",
    "TaskexecError": "taskexec.errors",
    "TaskFailed": "taskexec.errors",
    "Throttled": "taskexec.errors",
    "WaitTimeoutError": "taskexec.errors",
    "WorkerLostError": "taskexec.errors",
    "HandlerContext": "taskexec.handlers",
    "handler": "taskexec.handlers",
    "validator": "taskexec.handlers",
    "AttemptLog": "taskexec.models",
    "ErrorCode": "taskexec.models",
    "FlowState": "taskexec.models",
    "LimitState": "taskexec.models",
    "ManifestTask": "taskexec.models",
    "Notify": "taskexec.models",
    "RateLimit": "taskexec.models",
    "RetryPolicy": "taskexec.models",
    "RunManifest": "taskexec.models",
    "RunResult": "taskexec.models",
    "RunStatistics": "taskexec.models",
    "RunStatus": "taskexec.models",
    "RunSummary": "taskexec.models",
    "StopConditions": "taskexec.models",
    "TaskResult": "taskexec.models",
    "TaskStatus": "taskexec.models",
    "Plan": "taskexec.plan",
    "PlanTask": "taskexec.plan",
    "load_plan": "taskexec.plan",
    "parse_plan": "taskexec.plan",
    "compile_plan": "taskexec.plan.compiler",
    "Settings": "taskexec.settings",
    "Client": "taskexec.client",
    "RunHandle": "taskexec.client",
}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskexec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
