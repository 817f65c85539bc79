"""Secret params: resolved from the worker's environment, redacted from everything stored.

A plan never holds a secret's value, only where a worker finds it:

* a value ``{"secret": "ENV_NAME"}`` anywhere in a task's params (nested too, e.g. in a
  shell step's ``env``) becomes the worker's ``$ENV_NAME``;
* a param named in the task's ``secret_params`` holds the name of the environment
  variable (``api_key: OPENAI_API_KEY``); absent, the variable is the param's name in
  upper case (``API_KEY``).

So the run's manifest (in PostgreSQL), the Celery messages (ids only) and Flower never
see the value. The values a task resolved are then replaced by ``***`` in its output,
its error messages and its log lines before anything is stored or published.

Example:
    >>> params, found = resolve({"key": {"secret": "HOME"}}, [], {"HOME": "/root"})
    >>> params, redact({"echo": "home is /root"}, found)
    ({'key': '/root'}, {'echo': 'home is ***'})
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from taskexec.errors import ParamsError

__all__ = ["is_secret_ref", "redact", "resolve"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Shorter values are not redacted: replacing every "a" of an output helps nobody.
_MIN_REDACTED = 4


def is_secret_ref(value: Any) -> bool:
    """Whether a param value is a ``{"secret": "ENV_NAME"}`` reference."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("secret"), str)


def _lookup(name: str, env: Mapping[str, str], where: str) -> str:
    if not _NAME.match(name):
        raise ParamsError(f"{where}: {name!r} is not an environment variable name")
    value = env.get(name)
    if value is None:
        raise ParamsError(f"{where}: the secret ${name} is not set on this worker")
    return value


def resolve(
    params: dict[str, Any], secret_params: Iterable[str], env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Params with every secret resolved, and the secret values found (for :func:`redact`).

    Raises:
        ParamsError: A secret's variable is not set on this worker, or is not a valid name.
    """
    env = os.environ if env is None else env
    found: list[str] = []

    def walk(value: Any, where: str) -> Any:
        if is_secret_ref(value):
            secret = _lookup(value["secret"], env, where)
            found.append(secret)
            return secret
        if isinstance(value, dict):
            return {k: walk(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    out = {k: walk(v, f"params.{k}") for k, v in params.items()}
    for name in secret_params:
        ref = params.get(name, name.upper())
        if is_secret_ref(ref):
            continue  # resolved above
        if not isinstance(ref, str):
            raise ParamsError(f"params.{name}: a secret param names an environment variable")
        out[name] = _lookup(ref, env, f"params.{name}")
        found.append(out[name])
    return out, sorted({s for s in found if len(s) >= _MIN_REDACTED}, key=len, reverse=True)


def redact(value: Any, secrets: list[str]) -> Any:
    """``value`` (a JSON value or a string) with every secret replaced by ``***``."""
    if not secrets:
        return value
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, "***")
        return value
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    return value
