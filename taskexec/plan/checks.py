"""The checks of one plan task: a group or an atomic task, an allowed handler, the
operator's timeout bound, a known rate limit, secrets named, never held, and params that
its handler's model accepts (:class:`ParamsChecker`)."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_json

from taskexec import handlers
from taskexec.errors import HandlerNotAllowedError, PlanError
from taskexec.plan import templates
from taskexec.plan.schema import Plan, PlanTask, closest
from taskexec.settings import Settings

__all__ = ["ParamsChecker", "check_node"]

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


#: What a secret reference stands for while params are checked: the string it resolves to.
_SECRET = "<secret>"


class _Model:
    """A handler's params model, and the keys of params it reads (``None``: all of them)."""

    __slots__ = ("keys", "model")

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        self.keys: frozenset[str] | None = None
        if model.model_config.get("extra", "ignore") == "ignore":
            self.keys = frozenset(f.alias or name for name, f in model.model_fields.items())


class ParamsChecker:
    """Checks atomic tasks' params against their handler's params model
    (:func:`taskexec.handlers.params_model`: the built-ins', and those registered in this
    process); ``python:`` handlers and handlers without a model are not checked.

    Only the params a model reads are checked (a matrix case's other values are ignored,
    as the handler ignores them), once per distinct (handler, those params): a plan of
    100,000 tasks that differ in other params is checked once per handler. A secret
    (``{secret: NAME}``, or a param named in ``secret_params``) stands for a string, and
    a field holding one is not judged: its value is known on the worker only.

    Example:
        >>> ParamsChecker().problems("shell", {"argv": ["sleep", 10], "case": 1}, [])
        [('.argv[1]', 'Input should be a valid string')]
    """

    def __init__(self) -> None:
        self._models: dict[str, _Model | None] = {}
        self._seen: dict[tuple[str, bytes], list[tuple[str, str]]] = {}

    def model(self, handler: str) -> _Model | None:
        """The handler's model, or ``None``: its params are not checked."""
        try:
            return self._models[handler]
        except KeyError:
            found = None if handler.startswith("python:") else handlers.params_model(handler)
            self._models[handler] = m = _Model(found) if found is not None else None
            return m

    def problems(
        self, handler: str, params: dict[str, Any], secret_params: list[str], *layers: dict[str, Any]
    ) -> list[tuple[str, str]]:
        """What is wrong with ``params`` (``layers`` merged over them, the last winning):
        ``(path suffix, message)`` pairs, none when the handler accepts them."""
        m = self.model(handler)
        if m is None:
            return []
        if m.keys is None:
            read = dict(params)
            for layer in layers:
                read.update(layer)
        else:
            read = {k: params[k] for k in m.keys.intersection(params)}
            for layer in layers:
                if layer:
                    read.update((k, layer[k]) for k in m.keys.intersection(layer))
        for name in secret_params:  # each is a string on the worker, read from a variable
            if (m.keys is None or name in m.keys) and not _is_secret(read.get(name)):
                read[name] = {"secret": name}
        try:
            key = (handler, to_json(read) if read else b"")
        except ValueError:
            key = (handler, repr(read).encode())
        found = self._seen.get(key)
        if found is None:
            found = self._seen[key] = _judged(m.model, read)
        if found and any(templates.has_templates(v) for v in read.values()):
            # A template's value is known on the worker only: its field is not judged here.
            found = [p for p in found if not templates.has_templates(read.get(_top_key(p[0])))]
        if found and m.keys is not None:  # a required param missing: was it misspelt?
            return [_spelt(problem, m.keys, params, *layers) for problem in found]
        return found


def _top_key(where: str) -> str:
    """The param a problem's path suffix starts at: ``.argv[1]`` -> ``argv``."""
    return where[1:].split(".", maxsplit=1)[0].split("[", maxsplit=1)[0]


def _spelt(problem: tuple[str, str], keys: frozenset[str], *given: dict[str, Any]) -> tuple[str, str]:
    """A missing param's problem, with the closest unknown key given (``args`` for ``argv``)."""
    where, message = problem
    if message != "Field required" or where.count(".") != 1 or "[" in where:
        return problem
    unknown = {k for params in given for k in params if k not in keys}
    near = difflib.get_close_matches(where[1:], sorted(unknown), n=1, cutoff=0.6)
    return (where, f"{message} (did you mean {where[1:]!r} for {near[0]!r}?)") if near else problem


def _is_secret(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("secret"), str)


def _judged(model: type[BaseModel], params: dict[str, Any]) -> list[tuple[str, str]]:
    """``model``'s problems with ``params``, a secret standing for a string it does not judge."""
    secret_at: set[str] = set()

    def stand_in(value: Any, where: str) -> Any:
        if _is_secret(value):
            secret_at.add(where)
            return _SECRET
        if isinstance(value, dict):
            return {k: stand_in(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [stand_in(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    checked = {k: stand_in(v, f".{k}") for k, v in params.items()}
    return [(where, msg) for where, msg in handlers.params_errors(model, checked) if where not in secret_at]
