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

import difflib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskexec.errors import ParamsError, RetryableError, TaskFailed
from taskexec.settings import Settings

__all__ = [
    "MAX_OUTPUT_BYTES",
    "Handler",
    "HandlerContext",
    "RetryableError",
    "TaskFailed",
    "Validator",
    "HandlerTimedOut",
    "ApprovalParams",
    "HttpParams",
    "ShellParams",
    "StubParams",
    "BUILTIN_PARAMS",
    "check_output",
    "params_errors",
    "params_model",
    "handler",
    "parse_params",
    "registered",
    "registered_validator",
    "validator",
    "worker_settings",
]

#: Largest output a handler may return, as JSON, unless the operator sets another.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024


class HandlerTimedOut(RetryableError):
    """A handler's own time limit fired (``shell``'s ``params.timeout``).

    The attempt ends as when the task's ``timeout`` fires: ``timed_out`` (E002), retried
    while attempts remain. A :class:`RetryableError`, so that code catching those still does.
    """


def _never() -> bool:
    return False


def _discard(stream: str, text: str) -> None:
    """Where a handler's output goes outside a worker: nowhere."""


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
        logger: A logger named after the handler; on a worker, what it logs at INFO and above
            is kept in the attempt's logs too (``taskexec logs``).
        is_cancelled: Returns true once the run was cancelled: long handlers poll it.
        metrics: Numbers the handler reports (``tokens``, ``cost``...): stored per attempt.
        settings: The worker's settings: the operator's limits the built-in handlers apply
            (``TASKEXEC_SHELL_USER``, ``TASKEXEC_HTTP_ALLOW``). Default: :func:`worker_settings`.
        emit: ``emit(stream, text)``: output of the handler's own as it comes (a command's
            ``stdout`` line by line, an ``http`` status line): kept in the attempt's logs
            (``taskexec logs``, secrets masked) and streamed to ``taskexec logs --follow``.
            A context built outside a worker drops it.
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
    emit: Callable[[str, str], None] = field(default=_discard, repr=False)

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
_params: dict[str, type[BaseModel]] = {}


def handler(name: str, *, params: type[BaseModel] | None = None) -> Callable[[Handler], Handler]:
    """Register a function as the handler ``name`` (the operator must still allow it).

    ``params``: the pydantic model of its params; ``validate``/``compile`` in a process that
    registered it check plans against it (the built-ins' are :data:`BUILTIN_PARAMS`).
    """
    if not name or name.startswith("python:"):
        raise ValueError(f"a handler name is a plain word, not {name!r}")

    def register(fn: Handler) -> Handler:
        _handlers[name] = fn
        if params is not None:
            _params[name] = params
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
        where = _where(err["loc"]).lstrip(".")
        raise ParamsError(f"{handler_name} param {where}: {err['msg']}") from None


# The params of the built-in handlers: the handlers parse them at run time, and
# ``validate``/``compile`` check every task's params against them (after matrix and variant
# merges). They live here, in the contract, because the plan compiler never imports the
# worker side. Other params (a matrix case's values, a variant's) may sit beside them and
# are ignored: ``extra="ignore"``.


class ShellParams(BaseModel):
    """The params of ``shell``; matrix params may sit beside them and are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = Field(None, gt=0)
    parse_json: bool = False


class HttpParams(BaseModel):
    """The params of ``http``; matrix params may sit beside them and are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str = Field(pattern=r"^https?://")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(None, alias="json")
    timeout: float | None = Field(None, gt=0)


class StubParams(BaseModel):
    """The params the stub understands."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    delay: float = Field(0.0, ge=0, le=86_400)
    output: dict[str, Any] | None = None
    behavior: Literal["success", "failure", "timeout", "error"] = "success"
    fail_attempts: int = Field(0, ge=0)
    failure_rate: float = Field(0.0, ge=0, le=1)
    seed: int | str | None = None


class ApprovalParams(BaseModel):
    """The params of ``approval``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    message: str = Field("approve to continue", max_length=2000)
    timeout: float | None = Field(None, gt=0)


#: Built-in handler name -> the model its params are checked against.
BUILTIN_PARAMS: dict[str, type[BaseModel]] = {
    "shell": ShellParams,
    "http": HttpParams,
    "stub": StubParams,
    "approval": ApprovalParams,
}


def output_keys(name: str, params: dict[str, Any]) -> frozenset[str] | None:
    """The keys of a built-in handler's output, when they are known before it runs; else ``None``.

    >>> sorted(output_keys("shell", {"argv": ["true"]}))
    ['exit_code', 'stderr', 'stdout']
    >>> output_keys("shell", {"argv": ["true"], "parse_json": True}) is None
    True
    """
    if name == "shell":
        return None if params.get("parse_json") else frozenset({"exit_code", "stdout", "stderr"})
    if name == "http":
        return frozenset({"status_code", "headers", "json", "text"})
    if name == "stub":
        output = params.get("output")
        if output is None:
            return frozenset({"task_id", "attempt"})
        return frozenset(output) if isinstance(output, dict) else None
    return None


def params_model(name: str) -> type[BaseModel] | None:
    """The params model of the handler ``name``: a built-in's, or one registered with it;
    ``None`` (not checked) for ``python:`` handlers and handlers without one."""
    return BUILTIN_PARAMS.get(name) or _params.get(name)


def _where(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a path suffix: ``('argv', 1)`` -> ``.argv[1]``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def params_errors(model: type[BaseModel], params: dict[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with ``params`` for ``model``: ``(path suffix, message)`` pairs, none if valid.

    >>> params_errors(ShellParams, {"argv": ["sleep", 10]})
    [('.argv[1]', 'Input should be a valid string')]
    >>> params_errors(ShellParams, {"args": ["echo", "hi"]})
    [('.argv', "Field required (did you mean 'argv' for 'args'?)")]
    """
    try:
        model.model_validate(params)
    except ValidationError as e:
        out = []
        for err in e.errors():
            message = err["msg"]
            if err["type"] == "missing" and len(err["loc"]) == 1:
                near = difflib.get_close_matches(str(err["loc"][0]), [str(k) for k in params], 1, 0.6)
                if near:
                    message += f" (did you mean {err['loc'][0]!r} for {near[0]!r}?)"
            out.append((_where(err["loc"]), message))
        return out
    return []


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
