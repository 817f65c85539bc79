"""The plan file: its schema (strict: unknown keys are errors) and loading from YAML or JSON.

Every error is a :class:`~taskexec.errors.PlanError` (E001) naming the field path, e.g.
``E001 tasks[1].tasks[0].timeout: must be greater than 0``.

Example:
    >>> plan = parse_plan('tasks: [{id: hello, handler: stub}]')
    >>> plan.tasks[0].id
    'hello'
"""

from __future__ import annotations

import gc
import json
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from taskexec.errors import PlanError
from taskexec.matrix import MatrixSpec
from taskexec.models import Notify, PathCriterion, RateLimit, StopConditions, ValidatorCriterion

__all__ = [
    "MAX_PLAN_BYTES",
    "Defaults",
    "Plan",
    "PlanTask",
    "Policy",
    "RetrySpec",
    "load_plan",
    "parse_plan",
]

#: Plans larger than this are refused before parsing: a plan is a description, not data.
MAX_PLAN_BYTES = 10 * 1024 * 1024

_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetrySpec(_Strict):
    """Retry fields given in a plan; unset fields come from the enclosing level."""

    max_attempts: int | None = Field(None, ge=1, le=100)
    backoff: float | None = Field(None, ge=0, le=86_400)
    multiplier: float | None = Field(None, ge=1, le=100)
    max_backoff: float | None = Field(None, ge=0, le=86_400)
    jitter: bool | None = None


class Policy(_Strict):
    """Execution policy fields that a plan's defaults, a group or a task may set."""

    timeout: float | None = Field(None, gt=0)
    retry: RetrySpec | None = None
    priority: int | None = Field(None, ge=0, le=9)
    rate_limit: str | None = None


class Defaults(Policy):
    """Execution policy for every task of the plan, overridable per group or task."""

    concurrency: int | None = Field(None, ge=1, description="tasks of a run executing at once")


def _criterion_kind(value: Any) -> str:
    if isinstance(value, Mapping) and "validator" in value:
        return "validator"
    return "path"


PlanCriterion = Annotated[
    Annotated[PathCriterion, Tag("path")] | Annotated[ValidatorCriterion, Tag("validator")],
    Discriminator(_criterion_kind),
]


class PlanTask(Policy):
    """A task of the plan: atomic (with a handler) or a group (with child ``tasks``)."""

    id: str = Field(pattern=_ID_PATTERN)
    name: str | None = None
    handler: str | None = Field(None, min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    inputs: list[str] = Field(default_factory=list)
    output: str | None = Field(None, pattern=_ID_PATTERN)
    matrix: MatrixSpec | None = None
    criteria: list[PlanCriterion] = Field(default_factory=list, alias="validate")
    secret_params: list[str] = Field(
        default_factory=list, description="params holding the name of a worker environment variable"
    )
    tasks: list[PlanTask] | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Plan(_Strict):
    """A whole plan file."""

    id: str | None = Field(None, pattern=_ID_PATTERN)
    name: str | None = None
    description: str | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    stop: StopConditions = Field(default_factory=StopConditions)
    concurrency: int | None = Field(None, ge=1, description="tasks of a run executing at once, fleet-wide")
    notify: list[Notify] = Field(default_factory=list, description="webhooks for run events")
    variants: dict[str, dict[str, Any]] | None = Field(None, min_length=1)
    tasks: list[PlanTask] = Field(min_length=1)

    @property
    def plan_id(self) -> str:
        """The plan's id: ``id``, else its ``name`` as a slug, else ``plan``."""
        if self.id:
            return self.id
        if self.name:
            slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
            if slug:
                return slug[:200]
        return "plan"


class _FullCollectionsHeld:
    """Holds back CPython's full garbage collections while a plan or its manifests are built.

    Loading and compiling a 100k-task plan makes well over a million container objects
    (models, their dicts and lists) in one go. CPython runs a full collection, which walks
    every live container, each time the objects that survived the young generations reach a
    quarter of the heap: ten of them here, over a heap that no longer fits in the CPU cache.
    They took two thirds of the time (6.3 s of 9.5 s, measured) and made it grow faster than
    the plan. Young collections still run (cheap: recent objects, in cache); the threshold
    comes back when the build ends, and the next full collection walks the new objects once,
    as it does for any long-lived data. Nothing is left uncollected.

    Rejected: ``gc.disable()``. The first collections after it walk the whole build cold,
    as the young and then the middle generation, before the full one: slower in total,
    measured. Concurrent builds nest: the first saves the threshold, the last restores it
    (under a lock, so that no build saves another's raised value as the one to restore).
    """

    _NO_FULL = 1 << 30  # a gen-2 threshold that is never reached

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                young, middle, self._saved = gc.get_threshold()
                gc.set_threshold(young, middle, self._NO_FULL)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                young, middle, _ = gc.get_threshold()
                gc.set_threshold(young, middle, self._saved)


#: ``with full_collections_held:`` around building many objects at once.
full_collections_held = _FullCollectionsHeld()


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and loc[i - 2] == "validate" and isinstance(loc[i - 1], int):
            continue  # the union's tag ("path" or "validator"), not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "plan"


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "field required"
    if kind == "string_pattern_mismatch":
        return f"{err['input']!r} is not a valid id (letters, digits, _ . : -; at most 200 characters)"
    msg = str(err["msg"])
    return msg[0].lower() + msg[1:] if msg else kind


def plan_error_from(exc: ValidationError) -> PlanError:
    """The first error of a pydantic validation as a :class:`PlanError` with its field path."""
    errors = exc.errors()
    first = errors[0]
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return PlanError(_message(first) + more, path=_field_path(tuple(first["loc"])))


def _parse_text(text: str, origin: str) -> Any:
    if "\x00" in text:
        raise PlanError("is not a plan: it holds binary data", path=origin)
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise PlanError("the plan is empty", path=origin)
    if stripped[0] in "{[":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            raise PlanError(
                f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path=origin
            ) from None
    try:
        return yaml.safe_load(stripped)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PlanError(f"invalid YAML{where}: {problem}", path=origin) from None
    except RecursionError:
        raise PlanError("invalid YAML: nested too deeply", path=origin) from None


def parse_plan(source: str | Mapping[str, Any], *, origin: str = "plan") -> Plan:
    """Parse a plan from YAML or JSON text (told apart by content) or from a mapping.

    Args:
        source: The plan text, or an already parsed mapping.
        origin: What to call the source in errors, e.g. its file name.

    Raises:
        PlanError: The text is not a plan, or the plan breaks the schema.
    """
    with full_collections_held:
        data = _parse_text(source, origin) if isinstance(source, str) else source
        if not isinstance(data, Mapping):
            raise PlanError(
                f"a plan is a mapping with a 'tasks' list, not {type(data).__name__}", path=origin
            )
        try:
            return Plan.model_validate(data)
        except ValidationError as e:
            raise plan_error_from(e) from None
        except RecursionError:
            raise PlanError("the plan is nested too deeply", path=origin) from None


def load_plan(path: str | Path) -> Plan:
    """Load a plan file, YAML or JSON.

    Example:
        >>> load_plan("examples/quickstart.yaml").plan_id  # doctest: +SKIP
        'quickstart'

    Raises:
        PlanError: The file is missing, unreadable, too large, not text, or not a valid plan.
    """
    p = Path(path)
    origin = str(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        raise PlanError("no such plan file", path=origin) from None
    except IsADirectoryError:
        raise PlanError("is a directory, not a plan file", path=origin) from None
    except OSError as e:
        raise PlanError(f"cannot read the plan file: {e.strerror or e}", path=origin) from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(f"the plan file is larger than {MAX_PLAN_BYTES // (1024 * 1024)} MiB", path=origin)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(f"is not UTF-8 text (byte {e.start})", path=origin) from None
    plan = parse_plan(text, origin=origin)
    if plan.id is None and plan.name is None:
        stem = re.sub(r"[^A-Za-z0-9_.\-]+", "-", p.stem).strip("-") or "plan"
        plan = plan.model_copy(update={"id": stem[:200]})
    return plan
