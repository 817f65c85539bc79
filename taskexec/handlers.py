"""The handler contract: what a handler or validator author writes against.

A handler is ``fn(params, inputs, ctx) -> dict``: the task's params, its resolved input
artifacts and a :class:`HandlerContext`. It returns a JSON object (the task's output).
It raises :class:`RetryableError` to be retried with backoff, :class:`TaskFailed` to fail
at once; any other exception is an execution error and is retried while attempts remain.
A validator is ``fn(output, params) -> bool | (bool, message)``, used by a criterion
``{validator: name, params: {...}}``.

Both register by name in this process (:func:`handler`, :func:`validator`). Which names a
worker may run, and where else it finds them (built-ins, entry points, ``python:``), is the
worker's business: :mod:`workers.handlers`. This module imports nothing of the worker side,
so a handler module (``TASKEXEC_HANDLER_MODULES``) imports only ``taskexec``.

Example:
    >>> from taskexec.handlers import handler
    >>> @handler("double")
    ... def double(params, inputs, ctx):
    ...     return {"value": 2 * params["value"]}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from taskexec.errors import ParamsError, RetryableError, TaskFailed
from taskexec.settings import Settings

__all__ = [
    "MAX_OUTPUT_BYTES",
    "Handler",
    "HandlerContext",
    "RetryableError",
    "TaskFailed",
    "Validator",
    "check_output",
    "handler",
    "parse_params",
    "registered",
    "registered_validator",
    "validator",
    "worker_settings",
]

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


Validator = Callable[[Any, dict[str, Any]], "bool | tuple[bool, str]"]

_handlers: dict[str, Handler] = {}
_validators: dict[str, Validator] = {}


def handler(name: str) -> Callable[[Handler], Handler]:
    """Register a function as the handler ``name`` (the operator must still allow it)."""
    if not name or name.startswith("python:"):
        raise ValueError(f"a handler name is a plain word, not {name!r}")

    def register(fn: Handler) -> Handler:
        _handlers[name] = fn
        return fn

    return register


def registered() -> dict[str, Handler]:
    """The handlers registered in this process so far, by name."""
    return dict(_handlers)


def validator(name: str) -> Callable[[Validator], Validator]:
    """Register ``fn(output, params) -> bool | (bool, message)`` as the validator ``name``."""

    def register(fn: Validator) -> Validator:
        _validators[name] = fn
        return fn

    return register


def registered_validator(name: str) -> Validator | None:
    """The validator registered as ``name`` in this process, if any."""
    return _validators.get(name)


_P = TypeVar("_P", bound=BaseModel)


def parse_params(model: type[_P], params: dict[str, Any], handler_name: str) -> _P:
    """A handler's params checked against its pydantic model; E001 naming the first bad one.

    >>> from pydantic import BaseModel
    >>> class P(BaseModel):
    ...     delay: float = 0
    >>> try:
    ...     parse_params(P, {"delay": "soon"}, "stub")
    ... except ParamsError as e:
    ...     print(e.message)
    stub param delay: Input should be a valid number, unable to parse string as a number
    """
    try:
        return model.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise ParamsError(f"{handler_name} param {where}: {err['msg']}") from None


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
