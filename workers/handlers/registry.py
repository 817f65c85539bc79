"""The handler registry: names -> functions, the context handlers receive, lookup rules.

A handler is ``fn(params, inputs, ctx) -> dict``: the task's params, its resolved input
artifacts and a :class:`HandlerContext`. It returns a JSON object (the task's output).
It raises :class:`~taskexec.errors.RetryableError` to be retried with backoff,
:class:`~taskexec.errors.TaskFailed` to fail at once; any other exception is an
execution error and is retried while attempts remain.

Lookup of a name, in order: handlers registered with :func:`handler` (the built-ins,
and modules named by ``TASKEXEC_HANDLER_MODULES``), entry points of the group
``taskexec.handlers``, then ``python:module:function``. Only names the operator allows
(``TASKEXEC_ALLOWED_HANDLERS``) are ever looked up: a plan never brings code of its own.

Example:
    >>> from workers.handlers import handler
    >>> @handler("double")
    ... def double(params, inputs, ctx):
    ...     return {"value": 2 * params["value"]}
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

from taskexec.errors import HandlerNotAllowedError, TaskFailed
from taskexec.settings import Settings

__all__ = [
    "BUILTINS",
    "MAX_OUTPUT_BYTES",
    "Handler",
    "HandlerContext",
    "check_output",
    "handler",
    "load_modules",
    "registered",
    "resolve",
    "worker_settings",
]

#: Built-in handler name -> module that registers it (imported on first use).
BUILTINS = {
    "shell": "workers.handlers.shell",
    "http": "workers.handlers.http",
    "stub": "workers.handlers.stub",
    "approval": "workers.handlers.approval",
}

#: Largest output a handler may return, as JSON, unless the operator sets another.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024


def _never() -> bool:
    return False


def worker_settings() -> Settings:
    """The settings of the worker this process runs for: its Celery app's.

    Those are the settings :func:`workers.tasks.runtime` runs with (built from the
    environment on first use), so a handler applies the operator's limits (shell user,
    allowed destinations, allowed secrets) whoever built its context.
    """
    from taskexec.celery_app import app

    settings: Settings = app.conf.taskexec_settings
    return settings


@dataclass
class HandlerContext:
    """What a handler knows about the attempt it runs.

    Attributes:
        run_id: The run's id.
        task_id: The task's id within the run (``score[3]`` for a matrix case).
        attempt: This attempt's number, from 1.
        max_attempts: Attempts the retry policy allows in all.
        timeout: Seconds this attempt may take; the worker interrupts it after that.
        logger: A logger named after the handler.
        is_cancelled: Returns true once the run was cancelled: long handlers poll it.
        metrics: Numbers the handler reports (``tokens``, ``cost``...): stored per attempt.
        settings: The worker's settings: the operator's limits the built-in handlers apply
            (``TASKEXEC_SHELL_USER``, ``TASKEXEC_HTTP_ALLOW``). Default: :func:`worker_settings`.
    """

    run_id: str
    task_id: str
    attempt: int = 1
    max_attempts: int = 1
    timeout: float = 60.0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("taskexec.task"))
    is_cancelled: Callable[[], bool] = _never
    metrics: dict[str, float] = field(default_factory=dict)
    settings: Settings = field(default_factory=worker_settings, repr=False)

    @property
    def idempotency_key(self) -> str:
        """``run/task/attempt``: the same for every delivery of this attempt (the http
        handler's ``Idempotency-Key``: a retry after a 5xx is a new request)."""
        return f"{self.run_id}/{self.task_id}/{self.attempt}"

    @property
    def task_key(self) -> str:
        """``run/task``: the same for every attempt of the task, takeovers included.

        Key side effects that must happen once per task by it (a payment, a row): an attempt
        whose worker froze and came back after another attempt finished writes the same key.
        """
        return f"{self.run_id}/{self.task_id}"


class Handler(Protocol):
    """The signature of a handler."""

    def __call__(self, params: dict[str, Any], inputs: dict[str, Any], ctx: HandlerContext) -> Any: ...


_registry: dict[str, Handler] = {}


def handler(name: str) -> Callable[[Handler], Handler]:
    """Register a function as the handler ``name`` (the operator must still allow it)."""
    if not name or name.startswith("python:"):
        raise ValueError(f"a handler name is a plain word, not {name!r}")

    def register(fn: Handler) -> Handler:
        _registry[name] = fn
        return fn

    return register


def registered() -> dict[str, Handler]:
    """The handlers registered so far, by name."""
    return dict(_registry)


#: Handlers found through entry points, by name: scanning the installed distributions
#: takes milliseconds, and a task resolves its handler on every delivery.
_from_packages: dict[str, Handler] = {}


def _from_entry_points(name: str) -> Handler | None:
    if name in _from_packages:
        return _from_packages[name]
    for ep in entry_points(group="taskexec.handlers", name=name):
        fn: Handler = ep.load()
        _from_packages[name] = fn
        return fn
    return None


def _from_python(name: str) -> Handler:
    try:
        _, module, attr = name.split(":")
    except ValueError:
        raise HandlerNotAllowedError(f"{name!r} is not python:module:function") from None
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise HandlerNotAllowedError(f"handler {name!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise HandlerNotAllowedError(f"handler {name!r} is not callable")
    found: Handler = fn
    return found


def resolve(name: str, settings: Settings) -> Handler:
    """The function of an allowed handler.

    Raises:
        HandlerNotAllowedError: The operator does not allow ``name``, or it is not found (E010).
    """
    if not settings.handler_allowed(name):
        raise HandlerNotAllowedError(f"handler {name!r} is not allowed on this worker")
    if name.startswith("python:"):
        return _from_python(name)
    if name not in _registry and name in BUILTINS:
        importlib.import_module(BUILTINS[name])
    fn = _registry.get(name) or _from_entry_points(name)
    if fn is None:
        raise HandlerNotAllowedError(
            f"handler {name!r} is allowed but not registered on this worker "
            "(TASKEXEC_HANDLER_MODULES, or an entry point in group taskexec.handlers)"
        )
    return fn


def load_modules(settings: Settings) -> None:
    """Import the operator's handler modules (``TASKEXEC_HANDLER_MODULES``) so they register."""
    for module in settings.handler_modules:
        importlib.import_module(module)


def check_output(value: Any, max_bytes: int = MAX_OUTPUT_BYTES) -> dict[str, Any]:
    """A handler's return value as a JSON object; ``TaskFailed`` when it cannot be one.

    ``None`` becomes ``{}``. Non-finite floats are refused: JSON and PostgreSQL's JSONB
    have no NaN. Outputs larger than ``max_bytes`` (``TASKEXEC_MAX_OUTPUT_BYTES``) are refused.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TaskFailed(f"a handler must return a JSON object, not {type(value).__name__}")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TaskFailed(f"the handler's output is not JSON: {e}") from None
    if len(text) > max_bytes:
        raise TaskFailed(
            f"the handler's output is {len(text)} bytes, above the limit of {max_bytes} "
            "(TASKEXEC_MAX_OUTPUT_BYTES)"
        )
    out: dict[str, Any] = json.loads(text)
    return out
