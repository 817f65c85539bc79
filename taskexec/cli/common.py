"""What every ``taskexec`` command shares: exit codes, error reporting, plan and client setup."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar

import click
from pydantic import ValidationError

from taskexec.errors import (
    HandlerNotAllowedError,
    InvalidInputError,
    RunNotFoundError,
    ServiceUnavailableError,
    TaskexecError,
)
from taskexec.models import RunManifest, RunResult, RunStatus
from taskexec.plan import load_plan, params
from taskexec.plan.compiler import compile_plan
from taskexec.settings import Settings

if TYPE_CHECKING:
    from taskexec.client import Client

__all__ = [
    "EXIT_FAILED",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "RunRef",
    "exit_for",
    "fleet_or_embedded",
    "labels",
    "make_client",
    "manifests",
    "needs_fleet",
    "run_argument",
    "user_errors",
]

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3

P = ParamSpec("P")
R = TypeVar("R")


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def _fail(exc: BaseException, code: int) -> NoReturn:
    if _debug():
        traceback.print_exception(exc)
    click.echo(f"taskexec: {exc}", err=True)
    sys.exit(code)


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn taskexec's errors into one line on stderr and the contract's exit code."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (InvalidInputError, HandlerNotAllowedError, RunNotFoundError) as e:
            _fail(e, EXIT_INVALID)
        except ServiceUnavailableError as e:
            _fail(e, EXIT_UNAVAILABLE)
        except TaskexecError as e:
            _fail(e, EXIT_FAILED)
        except ValidationError as e:  # a TASKEXEC_* variable with a bad value
            err = e.errors()[0]
            name = "TASKEXEC_" + str(err["loc"][0]).upper() if err["loc"] else "environment"
            _fail(InvalidInputError(str(err["msg"]), path=name), EXIT_INVALID)

    return wrapper


def manifests(plan_path: str, settings: Settings, variant: str | None = None) -> list[RunManifest]:
    """Load and compile a plan file."""
    return compile_plan(load_plan(plan_path), settings, variant=variant)


def params_options(fn: Callable[..., R]) -> Callable[..., R]:
    """``--param NAME=VALUE`` (repeatable) and ``--params-file FILE``: the run parameters."""
    fn = click.option(
        "--params-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Run parameters from a JSON or YAML object (--param wins over it).",
    )(fn)
    return click.option(
        "--param",
        "param_pairs",
        multiple=True,
        metavar="NAME=VALUE",
        help="Set a run parameter the plan declares (repeatable; VALUE as JSON or text).",
    )(fn)


def with_params(found: list[RunManifest], pairs: tuple[str, ...], file: str | None) -> list[RunManifest]:
    """The manifests with the run parameters given by ``--params-file`` and ``--param``."""
    if not pairs and file is None:
        return [params.with_params(m, None) for m in found]  # required params still checked
    given = params.read_file(file) if file is not None else {}
    specs = found[0].params if found else {}
    given.update(params.parse_pairs(pairs, specs))
    return [params.with_params(m, given) for m in found]


def make_client(settings: Settings | None = None) -> Client:
    """A client for ``settings`` (default: the environment)."""
    from taskexec.client import Client

    return Client(settings or Settings())


def needs_fleet(settings: Settings, what: str) -> None:
    """Refuse a command that only makes sense with a broker configured."""
    if settings.embedded:
        raise InvalidInputError(f"{what} needs a fleet: set TASKEXEC_BROKER_URL", path="TASKEXEC_BROKER_URL")


def fleet_or_embedded(what: str) -> Settings:
    """Settings of the fleet, or of the embedded ``taskexec run`` in progress under home.

    Raises:
        InvalidInputError: Neither a broker is configured nor an embedded run is in progress.
    """
    settings = Settings()
    if not settings.embedded:
        return settings
    from taskexec.embedded import attach

    attached = attach(settings)
    if attached is None:
        raise InvalidInputError(
            f"{what} needs a fleet (TASKEXEC_BROKER_URL) or an embedded `taskexec run` in progress "
            f"under TASKEXEC_HOME ({settings.home})",
            path="TASKEXEC_BROKER_URL",
        )
    return attached


def exit_for(results: list[RunResult]) -> int:
    """0 when every run succeeded, else 1."""
    return EXIT_OK if all(r.status is RunStatus.SUCCEEDED for r in results) else EXIT_FAILED


def labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` options as a mapping."""
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"a label is KEY=VALUE, not {p!r}", path="--label")
        out[key] = value
    return out


@dataclass(frozen=True)
class RunRef:
    """What a command's ``RUN`` stands for: a run id or a unique prefix of it, or ``--last``
    (the newest run, of ``--plan``'s plan if given)."""

    text: str | None
    last: bool = False
    plan: str | None = None

    def resolve(self, client: Client) -> str:
        """The full run id, looked up in ``client``'s store.

        Raises:
            InvalidInputError: Neither RUN nor --last, or both, or --plan without --last;
                an ambiguous prefix.
            RunNotFoundError: No such run (or no run at all for --last).
        """
        if self.last and self.text is not None:
            raise InvalidInputError(f"give RUN ({self.text!r}) or --last, not both", path="--last")
        if self.plan is not None and not self.last:
            raise InvalidInputError("--plan picks the newest run of a plan with --last", path="--plan")
        if self.last:
            return client.last_run(_plan_id(self.plan) if self.plan is not None else None)
        if self.text is None:
            raise InvalidInputError("missing RUN: a run id, a unique prefix of one, or --last", path="RUN")
        return client.resolve_run(self.text)


def _plan_id(plan: str) -> str:
    """A plan id, or the id of the plan in the file ``plan`` names."""
    from pathlib import Path

    if Path(plan).is_file():
        return load_plan(plan).plan_id
    return plan


def run_argument(fn: Callable[..., R]) -> Callable[..., R]:
    """A command's ``RUN`` argument with ``--last`` and ``--plan``: the command receives
    ``run`` (a :class:`RunRef`) in their place."""

    @wraps(fn)
    def wrapper(*args: object, run_id: str | None, last: bool, last_plan: str | None, **kwargs: object) -> R:
        return fn(*args, run=RunRef(run_id, last, last_plan), **kwargs)

    wrapper = click.option(
        "--plan",
        "last_plan",
        default=None,
        metavar="PLAN",
        help="With --last: the newest run of this plan (its id, or its plan file).",
    )(wrapper)
    wrapper = click.option("--last", is_flag=True, help="The newest run instead of RUN.")(wrapper)
    return click.argument("run_id", metavar="RUN", required=False)(wrapper)
