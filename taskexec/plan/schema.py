"""The plan file's schema: strict pydantic models (unknown keys are errors), and a
validation error turned into a :class:`~taskexec.errors.PlanError` naming the field path,
e.g. ``E001 tasks[1].tasks[0].timeout: must be greater than 0``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from taskexec.errors import MAX_ERRORS, PlanError
from taskexec.models import InputRef, Notify, PathCriterion, RateLimit, StopConditions, ValidatorCriterion
from taskexec.plan.matrix import MatrixSpec

__all__ = ["Defaults", "Plan", "PlanTask", "Policy", "RetrySpec", "plan_error_from"]

_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Validated:
    """Models built in code raise the plan's own error (E001 with the field path), never
    pydantic's ``ValidationError``."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise plan_error_from(e, type(self)) from None  # type: ignore[arg-type]

    # Not a custom __init__ to pydantic: validating a plan file (model_validate) does not call
    # it for every nested task, so errors there keep their full path (tasks[1].depend_on).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


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
    execution: Literal["stages", "dag"] | None = Field(
        None, description="stages: a barrier after each stage (default); dag: each task after its upstream"
    )


def _criterion_kind(value: Any) -> str:
    if isinstance(value, Mapping) and "validator" in value:
        return "validator"
    return "path"


PlanCriterion = Annotated[
    Annotated[PathCriterion, Tag("path")] | Annotated[ValidatorCriterion, Tag("validator")],
    Discriminator(_criterion_kind),
]


class PlanTask(_Validated, Policy):
    """A task of the plan: atomic (with a handler) or a group (with child ``tasks``).

    Built in code, a bad field raises :class:`~taskexec.errors.PlanError` (E001 and the
    field's path), as a plan file does:

    >>> PlanTask(id="a", handler="stub", depend_on=["b"])
    Traceback (most recent call last):
    ...
    taskexec.errors.PlanError: E001 depend_on: unknown field (did you mean depends_on?)
    """

    id: str = Field(pattern=_ID_PATTERN)
    name: str | None = None
    handler: str | None = Field(None, min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    inputs: list[str | InputRef] = Field(
        default_factory=list, description="artifact names, or {from, path, as} to select part of one"
    )
    output: str | None = Field(None, pattern=_ID_PATTERN)
    matrix: MatrixSpec | None = None
    criteria: list[PlanCriterion] = Field(default_factory=list, alias="validate")
    secret_params: list[str] = Field(
        default_factory=list, description="params holding the name of a worker environment variable"
    )
    tasks: list[PlanTask] | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Plan(_Validated, _Strict):
    """A whole plan file."""

    id: str | None = Field(None, pattern=_ID_PATTERN)
    name: str | None = None
    description: str | None = None
    params: dict[str, Any] = Field(
        default_factory=dict, description="run parameters: name -> default, or {type, default, description}"
    )
    defaults: Defaults = Field(default_factory=Defaults)
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    stop: StopConditions = Field(default_factory=StopConditions)
    concurrency: int | None = Field(None, ge=1, description="tasks of a run executing at once, fleet-wide")
    execution: Literal["stages", "dag"] | None = Field(
        None, description="stages: a barrier after each stage (default); dag: each task after its upstream"
    )
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


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds (``X | None``, ``list[X]``, ``dict[str, X]``, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _keys_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys known where ``loc`` points (the mapping that holds its last part)."""
    models: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an item of a list: the same models
        inner: list[type[BaseModel]] = []
        for m in models:
            fields = {f.alias or name: f for name, f in m.model_fields.items()}
            if part in fields:
                inner.extend(_models_in(fields[part].annotation))
        if inner:
            models = inner
        # else: a dict key or a union's tag ("path", "validator"): the same models
    return sorted({k for m in models for k in _keys(m)})


def closest(name: object, known: Iterable[str]) -> str:
    """`` (did you mean X?)``: the known name closest to ``name``, or nothing when none is close."""
    if not isinstance(name, str):
        return ""
    found = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {found[0]}?)" if found else ""


def _error(err: Any, root: type[BaseModel]) -> PlanError:
    loc = tuple(err["loc"])
    message = _message(err)
    if err["type"] == "extra_forbidden" and loc:
        message += closest(loc[-1], _keys_at(root, loc))
    return PlanError(message, path=_field_path(loc))


def plan_error_from(exc: ValidationError, root: type[BaseModel] | None = None) -> PlanError:
    """A pydantic validation as a :class:`PlanError` with the first error's field path,
    carrying every error (at most :data:`~taskexec.errors.MAX_ERRORS`) in ``errors``.

    ``root`` is the model validated (default :class:`Plan`): it tells which keys a typo
    was meant to be (``depend_on``: ``did you mean depends_on?``).
    """
    errors = exc.errors()
    built = [_error(e, root or Plan) for e in errors[:MAX_ERRORS]]
    return cast(PlanError, PlanError.gathered(list(built), total=len(errors)))
