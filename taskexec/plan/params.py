"""Run parameters: what a plan declares under ``params:`` and what a submitter overrides.

A plan declares each parameter by its default (the type follows the value) or in full::

    params:
      model: gpt-4o                 # a string, default gpt-4o
      rows: 100                     # an int
      langs: {type: list, default: [en, de]}
      api_base: {type: string}      # no default: every run must give it

Templates read them as ``{{ params.model }}``. ``taskexec run|submit --param k=v``,
``--params-file``, ``Client.submit(params=...)`` and ``schedule add --param`` override
them; an unknown name or a value of the wrong type is E001 naming the param.

>>> specs = declare({"rows": 100, "model": {"type": "string"}})
>>> apply(specs, {"model": "m1"})
{'rows': 100, 'model': 'm1'}
>>> apply(specs, {"rows": "many", "model": "m1"})
Traceback (most recent call last):
...
taskexec.errors.PlanError: E001 params.rows: must be an int, not 'many'
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from taskexec.errors import InvalidInputError, PlanError
from taskexec.models import PARAM_TYPES, ParamSpec, RunManifest

__all__ = ["apply", "declare", "defaults", "parse_pairs", "read_file", "with_params"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
_SPEC_KEYS = frozenset({"type", "default", "description"})
_ARTICLE = {"int": "an int", "object": "an object", "float": "a float", "list": "a list"}


def _type_of(value: Any) -> str | None:
    for name, types in (("bool", (bool,)), ("int", (int,)), ("float", (float,)), ("string", (str,))):
        if isinstance(value, types):
            return name
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return None


def declare(raw: Mapping[str, Any]) -> dict[str, ParamSpec]:
    """The plan's ``params:`` as specs; :class:`PlanError` (E001 ``params.x``) when one is wrong.

    A mapping of only ``type``/``default``/``description`` (with ``type`` or ``default``) is
    a full declaration; any other value is a default.
    """
    specs: dict[str, ParamSpec] = {}
    for name, value in raw.items():
        where = f"params.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise PlanError(f"{name!r} is not a param name (letters, digits, _)", path=where)
        if (
            isinstance(value, Mapping)
            and value
            and set(value) <= _SPEC_KEYS
            and set(value) & {"type", "default"}
        ):
            kind = value.get("type")
            if kind is not None and kind not in PARAM_TYPES:
                raise PlanError(
                    f"unknown type {kind!r} (one of {', '.join(PARAM_TYPES)})", path=f"{where}.type"
                )
            has_default = "default" in value
            spec = ParamSpec(
                type=kind or (_type_of(value["default"]) if has_default else None),
                default=value.get("default"),
                required=not has_default,
                description=value.get("description"),
            )
            if has_default:
                _check(spec, value["default"], f"{where}.default")
        else:
            spec = ParamSpec(type=_type_of(value), default=value)
        specs[name] = spec
    return specs


def _check(spec: ParamSpec, value: Any, where: str) -> Any:
    if spec.type is None or (value is None and not spec.required):
        return value
    types = PARAM_TYPES[spec.type]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        shown = json.dumps(value) if not isinstance(value, str) else repr(value)
        raise PlanError(f"must be {_ARTICLE.get(spec.type, 'a ' + spec.type)}, not {shown[:80]}", path=where)
    return float(value) if spec.type == "float" and isinstance(value, int) else value


def defaults(specs: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """The values of a run that overrides nothing (required params left out)."""
    return {name: spec.default for name, spec in specs.items() if not spec.required}


def apply(specs: Mapping[str, ParamSpec], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's values: defaults with ``overrides`` applied, every one checked."""
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in specs:
            from taskexec.plan.schema import closest

            known = f"; the plan declares {', '.join(sorted(specs))}" if specs else "; the plan declares none"
            raise PlanError(f"unknown param{closest(name, specs)}{known}", path=f"params.{name}")
    values = defaults(specs)
    for name, value in overrides.items():
        values[name] = _check(specs[name], value, f"params.{name}")
    missing = [name for name, spec in specs.items() if spec.required and name not in values]
    if missing:
        raise PlanError("required param not given (--param NAME=VALUE)", path=f"params.{missing[0]}")
    return values


def with_params(manifest: RunManifest, overrides: Mapping[str, Any] | None) -> RunManifest:
    """``manifest`` with ``overrides`` applied over its param values (all checked, required
    ones given); itself when nothing changes."""
    if not manifest.params:
        if overrides:
            apply({}, overrides)  # raises: unknown param
        return manifest
    values = apply(manifest.params, {**manifest.param_values, **(overrides or {})})
    if values == manifest.param_values:
        return manifest
    return manifest.model_copy(update={"param_values": values})


def parse_pairs(pairs: Iterable[str], specs: Mapping[str, ParamSpec] | None = None) -> dict[str, Any]:
    """``--param key=value`` options as values: JSON when it parses (``3``, ``true``, ``[1, 2]``),
    else the text; a param declared ``string`` always takes the text as it is."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidInputError(f"{pair!r} is not NAME=VALUE", path="--param")
        spec = (specs or {}).get(name)
        if spec is not None and spec.type == "string":
            out[name] = text
            continue
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """A ``--params-file``: a JSON or YAML object of param values."""
    from taskexec.plan.loader import MAX_PLAN_BYTES, parse_data

    where = f"--params-file {path}"
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise InvalidInputError(f"cannot read: {e.strerror or e}", path=where) from None
    if len(raw) > MAX_PLAN_BYTES:
        raise InvalidInputError(f"larger than {MAX_PLAN_BYTES // (1024 * 1024)} MiB", path=where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"is not UTF-8 text (byte {e.start})", path=where) from None
    data = parse_data(text, where)
    if not isinstance(data, dict):
        raise InvalidInputError("must hold an object of param values", path=where)
    return data
