"""Output criteria: ``{path, op, value}`` checks over dotted paths, or registered validators.

Ops: ``exists == != > >= < <= in not_in regex``. A path is dotted keys, with integer
segments indexing lists (``results.0.score``). A value that is missing fails its
criterion (E008 once attempts are used up); a criterion that cannot be evaluated, such as
``>=`` between a string and a number, an ``in`` without a list or a bad regex, raises
:class:`~taskexec.errors.CriteriaError` (E007).

A registered validator (``{validator: name, params: {...}}``) is a function
``fn(output, params) -> bool | (bool, message)`` registered with
:func:`taskexec.handlers.validator`; ``nonempty`` is built in.

Example:
    >>> from taskexec.models import PathCriterion
    >>> [r] = evaluate([PathCriterion(path="score", op=">=", value=0.8)], {"score": 0.9})
    >>> r.passed
    True
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from taskexec.errors import CriteriaError
from taskexec.handlers import registered_validator, validator
from taskexec.models import Criterion, PathCriterion, ValidatorCriterion

__all__ = ["MISSING", "CriterionResult", "evaluate", "lookup"]

MISSING = _MISSING = object()  # what lookup returns for a path that is not there

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass(frozen=True)
class CriterionResult:
    """The verdict on one criterion."""

    passed: bool
    message: str


@validator("nonempty")
def _nonempty(output: Any, params: dict[str, Any]) -> tuple[bool, str]:
    """Passes when the output (or ``params.path`` in it) is present and not empty."""
    value = lookup(output, params["path"]) if "path" in params else output
    ok = value is not _MISSING and value not in (None, "", [], {})
    return ok, "is not empty" if ok else "is empty"


def lookup(output: Any, path: str) -> Any:
    """The value at a dotted path of the output, or a sentinel when there is none."""
    value = output
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, list) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check(c: PathCriterion, output: Any) -> CriterionResult:
    value = lookup(output, c.path)
    shown = f"{c.path} {c.op}" + ("" if c.op == "exists" else f" {c.value!r}")
    if c.op == "exists":
        ok = value is not _MISSING if c.value in (None, True) else value is _MISSING
        return CriterionResult(ok, f"{c.path} {'exists' if value is not _MISSING else 'is missing'}")
    if value is _MISSING:
        return CriterionResult(False, f"{shown}: {c.path} is missing")
    if c.op in ("==", "!="):
        ok = (value == c.value) == (c.op == "==")
    elif c.op in _COMPARE:
        comparable = (_number(value) and _number(c.value)) or (
            isinstance(value, str) and isinstance(c.value, str)
        )
        if not comparable:
            raise CriteriaError(
                f"cannot compare {c.path} = {value!r} ({type(value).__name__}) {c.op} {c.value!r}"
            )
        ok = _COMPARE[c.op](value, c.value)
    elif c.op in ("in", "not_in"):
        if not isinstance(c.value, list):
            raise CriteriaError(f"{c.path} {c.op}: the value must be a list, not {c.value!r}")
        ok = (value in c.value) == (c.op == "in")
    else:  # regex
        if not isinstance(c.value, str) or not isinstance(value, str):
            raise CriteriaError(f"{c.path} regex: needs a string pattern and a string value, got {value!r}")
        try:
            ok = re.search(c.value, value) is not None
        except re.error as e:
            raise CriteriaError(f"{c.path} regex {c.value!r}: {e}") from None
    return CriterionResult(ok, f"{shown}: got {value!r}"[:300])


def _run_validator(c: ValidatorCriterion, output: Any) -> CriterionResult:
    fn = registered_validator(c.validator)
    if fn is None:
        raise CriteriaError(f"no validator {c.validator!r} is registered on this worker")
    try:
        verdict = fn(output, c.params)
    except CriteriaError:
        raise
    except Exception as e:
        raise CriteriaError(f"validator {c.validator!r} raised {type(e).__name__}: {e}") from e
    ok, message = verdict if isinstance(verdict, tuple) else (bool(verdict), "")
    return CriterionResult(bool(ok), f"{c.validator}: {message}".rstrip(": "))


def evaluate(criteria: Sequence[Criterion], output: Any) -> list[CriterionResult]:
    """Every criterion's verdict on ``output``.

    Raises:
        CriteriaError: A criterion could not be evaluated (E007).
    """
    return [
        _check(c, output) if isinstance(c, PathCriterion) else _run_validator(c, output) for c in criteria
    ]
