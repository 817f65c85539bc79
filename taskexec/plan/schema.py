"""The plan file's schema: strict pydantic models (unknown keys are errors), and a
validation error turned into a :class:`~taskexec.errors.PlanError` naming the field path,
e.g. ``E001 tasks[1].tasks[0].timeout: must be greater than 0``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from taskexec.errors import PlanError
from taskexec.models import Notify, PathCriterion, RateLimit, StopConditions, ValidatorCriterion
from taskexec.plan.matrix import MatrixSpec

__all__ = ["Defaults", "Plan", "PlanTask", "Policy", "RetrySpec", "plan_error_from"]

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
