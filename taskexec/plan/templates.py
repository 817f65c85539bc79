"""Templated handler params: ``{{ params.x }}``, ``{{ case.model }}``, ``{{ inputs.dataset.rows }}``,
``{{ run.id }}``, ``{{ task.id }}``.

A plan keeps its templates (``compile --json`` shows them); a worker renders them just before
the handler runs, with Jinja2's immutable sandbox and ``StrictUndefined``: a missing name is
an error naming the task and the expression, and nothing reaches Python internals
(``params.__class__`` is refused). A string that is one expression and nothing else keeps
the value's type (``"{{ params.n }}"`` gives ``3``, not ``"3"``); any other string renders
to a string. Secrets never take part: a ``secret_params`` value is the *name* of a worker
variable, resolved after rendering, so a rendered param never holds a secret.

>>> render({"url": "http://h/{{ case.model }}", "n": "{{ params.n }}"},
...        {"params": {"n": 3}, "case": {"model": "m1"}})
{'url': 'http://h/m1', 'n': 3}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["NAMES", "TemplateProblem", "has_templates", "problems", "render"]

#: The names a template may use.
NAMES = ("params", "case", "inputs", "run", "task")

_ONE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.DOTALL)


class TemplateProblem(ValueError):
    """A template that cannot be rendered: ``where`` is the param's path, e.g. ``params.url``."""

    def __init__(self, where: str, expression: str, reason: str) -> None:
        super().__init__(f"{where}: {expression.strip()!s}: {reason}")
        self.where, self.expression, self.reason = where, expression, reason


@lru_cache(maxsize=1)
def _env() -> ImmutableSandboxedEnvironment:
    """The sandbox (imported on first use: most plans hold no template, and start-up counts)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
    )


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def has_templates(value: Any) -> bool:
    """Whether ``value`` (params: a dict, list or scalar) holds a template anywhere."""
    return any(_is_template(text) for _, text in _strings(value, ""))


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")


@lru_cache(maxsize=4096)
def _compiled(text: str) -> tuple[Any, bool]:
    """``(compiled, native)``: an expression (keeps its type) or a template (renders a string)."""
    one = _ONE_EXPRESSION.match(text)
    if one is not None:
        return _env().compile_expression(one["expr"], undefined_to_none=False), True
    return _env().from_string(text), False


def _render_one(text: str, context: Mapping[str, Any], where: str) -> Any:
    if not _is_template(text):
        return text
    from jinja2 import TemplateError, Undefined

    try:
        compiled, native = _compiled(text)
        if not native:
            return compiled.render(**context)
        value = compiled(**context)
        if isinstance(value, Undefined):  # an expression's result is not rendered: ask it
            value._fail_with_undefined_error()
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise TemplateProblem(where, text, f"gives a {type(value).__name__}, not a JSON value") from None
        return value
    except TemplateError as e:
        raise TemplateProblem(where, text, e.message or type(e).__name__) from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as e:
        raise TemplateProblem(where, text, f"{type(e).__name__}: {e}") from None


def render(value: Any, context: Mapping[str, Any], where: str = "params") -> Any:
    """``value`` with every template filled in from ``context``; :class:`TemplateProblem` if one fails."""
    if isinstance(value, str):
        return _render_one(value, context, where)
    if isinstance(value, Mapping):
        return {k: render(v, context, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _attribute_chains(tree: nodes.Node) -> Iterator[tuple[str, str | None]]:
    """``(name, first attribute)`` of every name a template reads: ``params.x`` -> ``(params, x)``."""
    from jinja2 import nodes

    seen: set[int] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, (nodes.Getattr, nodes.Getitem))
        inner = node.node
        if isinstance(inner, nodes.Name) and id(inner) not in seen:
            seen.add(id(inner))
            if isinstance(node, nodes.Getattr):
                yield inner.name, node.attr
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                yield inner.name, node.arg.value
            else:
                yield inner.name, None
    for name in tree.find_all(nodes.Name):
        if id(name) not in seen and name.ctx == "load":
            yield name.name, None


def problems(
    value: Any, *, params: Mapping[str, Any] | None, inputs: list[str], case: Mapping[str, Any] | None
) -> list[tuple[str, str]]:
    """What a compile can tell is wrong with the templates in ``value``: ``(where, message)``.

    Syntax errors, names other than :data:`NAMES`, ``params.x`` that the plan does not
    declare, ``inputs.x`` the task does not take, ``case.x`` outside its matrix case.
    """
    from jinja2 import TemplateError, nodes

    out: list[tuple[str, str]] = []
    for where, text in _strings(value, "params"):
        if not _is_template(text):
            continue
        try:
            one = _ONE_EXPRESSION.match(text)
            tree = _env().parse("{{" + one["expr"] + "}}" if one else text)
        except TemplateError as e:
            out.append((where, f"template {text.strip()!r}: {e.message}"))
            continue
        bound = [*tree.find_all(nodes.Assign), *(f.target for f in tree.find_all(nodes.For))]
        defined = {name.name for b in bound for name in b.find_all(nodes.Name)}
        for name, attr in _attribute_chains(tree):
            if name in defined:
                continue
            known: Mapping[str, Any] | list[str] | None = None
            if name not in NAMES:
                out.append(
                    (where, f"template {text.strip()!r}: unknown name {name!r} (use {', '.join(NAMES)})")
                )
                continue
            if name == "params":
                known = params or {}
            elif name == "inputs":
                known = inputs
            elif name == "case":
                known = case or {}
            elif name == "run":
                known = ["id"]
            elif name == "task":
                known = ["id", "attempt"]
            if attr is not None and known is not None and attr not in known:
                what = "declared" if name == "params" else "known"
                out.append((where, f"template {text.strip()!r}: no {name}.{attr} ({what}: {_listed(known)})"))
    return out


def _listed(known: Mapping[str, Any] | list[str]) -> str:
    names = sorted(known)
    return ", ".join(names) if names else "none"
