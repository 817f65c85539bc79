"""The checks of one plan task: a group or an atomic task, an allowed handler, the
operator's timeout bound, a known rate limit, and secrets named, never held."""

from __future__ import annotations

import re
from typing import Any

from taskexec.errors import HandlerNotAllowedError, PlanError
from taskexec.plan.schema import Plan, PlanTask, closest
from taskexec.settings import Settings

__all__ = ["check_node"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OWN_SETTING = "${} is a setting of the worker (TASKEXEC_*), never a secret a plan may read"


def check_node(task: PlanTask, path: str, plan: Plan, settings: Settings, allowed: dict[str, bool]) -> None:
    if task.tasks is not None:
        if not task.tasks:
            raise PlanError("a group needs at least one task", path=f"{path}.tasks")
        for key in ("handler", "matrix", "output"):
            if getattr(task, key) is not None:
                raise PlanError(f"a group (a task with 'tasks') has no {key}", path=f"{path}.{key}")
        for key in ("params", "inputs", "criteria", "secret_params"):
            if getattr(task, key):
                name = "validate" if key == "criteria" else key
                raise PlanError(f"a group (a task with 'tasks') has no {name}", path=f"{path}.{name}")
        return
    handler = task.handler
    if handler is None:
        raise PlanError("an atomic task needs a handler (or child 'tasks')", path=f"{path}.handler")
    ok = allowed.get(handler)
    if ok is None:
        ok = allowed[handler] = settings.handler_allowed(handler)
    if not ok:
        names = ", ".join(settings.allowed_handlers)
        hint = closest(handler, settings.allowed_handlers)
        raise HandlerNotAllowedError(
            f"handler {handler!r} is not allowed here (allowed: {names}){hint}", path=f"{path}.handler"
        )
    if task.timeout is not None and task.timeout > settings.max_task_timeout:
        raise PlanError(
            f"timeout {task.timeout:g} s is above the operator's maximum of {settings.max_task_timeout:g} s",
            path=f"{path}.timeout",
        )
    if task.rate_limit is not None and task.rate_limit not in plan.rate_limits:
        raise PlanError(f"unknown rate limit {task.rate_limit!r}", path=f"{path}.rate_limit")
    if task.params or task.secret_params:
        _check_secrets(task, path)


def _names_a_secret(ref: object) -> bool:
    # A worker's own settings (TASKEXEC_*) are never secrets: refused here already, so
    # that the plan's author hears it at validate time, not from a failed task.
    return isinstance(ref, str) and bool(_ENV_NAME.match(ref)) and not ref.startswith("TASKEXEC_")


def _bad_secret(value: Any) -> tuple[list[str], Any] | None:
    """A malformed ``{secret: ...}`` in ``value``: its path parts, innermost first, and the value."""
    if isinstance(value, dict):
        if "secret" in value and len(value) == 1:
            ref = value["secret"]
            return None if _names_a_secret(ref) else ([], ref)
        items: Any = value.items()
        fmt = ".{}"
    elif isinstance(value, list):
        items = enumerate(value)
        fmt = "[{}]"
    else:
        return None
    for k, v in items:
        # Scalars hold no secret: skip the call, most params are scalars.
        if isinstance(v, (dict, list)) and (found := _bad_secret(v)) is not None:
            found[0].append(fmt.format(k))
            return found
    return None


def _check_secrets(task: PlanTask, path: str) -> None:
    """Secret params name environment variables; a literal value would be stored with the run."""
    found = _bad_secret(task.params)
    if found is not None:
        parts, ref = found
        raise PlanError(
            _OWN_SETTING.format(ref)
            if isinstance(ref, str) and ref.startswith("TASKEXEC_")
            else f"a secret is {{secret: ENV_NAME}}, the name of a worker environment variable, not {ref!r}",
            path=f"{path}.params" + "".join(reversed(parts)),
        )
    for k, name in enumerate(task.secret_params):
        ref = task.params.get(name, name.upper())
        if isinstance(ref, dict) and set(ref) == {"secret"}:
            continue
        if isinstance(ref, str) and ref.startswith("TASKEXEC_"):
            raise PlanError(_OWN_SETTING.format(ref), path=f"{path}.secret_params[{k}]")
        if not isinstance(ref, str) or not _ENV_NAME.match(ref):
            raise PlanError(
                f"secret param {name!r} must name a worker environment variable (e.g. OPENAI_API_KEY), "
                "not hold the secret: the plan is stored with the run",
                path=f"{path}.secret_params[{k}]",
            )
