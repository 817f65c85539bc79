"""The ``taskexec`` command (contract: shared/CLI.md).

Exit codes: 0 success, 1 a run finished and some task did not succeed, 2 invalid input,
3 a service is unreachable. Errors are one line on stderr naming their code; a traceback
only with ``--debug``. One module per group of commands: :mod:`~taskexec.cli.plans`
(validate, compile), :mod:`~taskexec.cli.runs` (run, submit, status, results, watch,
cancel, resume, runs), :mod:`~taskexec.cli.logs` (logs), :mod:`~taskexec.cli.fleet` (worker, db),
:mod:`~taskexec.cli.ui` (ui).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

__all__ = ["COMMANDS", "main"]

#: Every command: its name -> where it is defined (``module:attribute``) and its one-line
#: help. A command's module is imported only when that command runs: ``taskexec --help``
#: and ``validate`` never import Celery, kombu, Redis or SQLAlchemy (start-up counts).
#: ``tests/test_imports.py`` checks each line against the command's own help.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": (
        "plans:validate",
        "Load and compile PLAN; exit 0 when it is valid, 2 with its errors when not.",
    ),
    "compile": (
        "plans:compile_",
        "Compile PLAN into run manifests, one per variant: every task of every stage "
        "(--brief: the first 8 of a stage), or the manifests as JSON.",
    ),
    "run": (
        "runs:run",
        "Submit every variant of PLAN and wait for the runs (embedded mode without a broker).",
    ),
    "submit": ("runs:submit", "Submit PLAN to the fleet and print the run ids, one a line."),
    "status": (
        "runs:status",
        "Show one run's result (RUN: its id, a unique prefix of 6+ characters, or --last); "
        "exit 1 when it ended without success.",
    ),
    "results": (
        "runs:results",
        "Print a run's task results as JSON, JUnit XML, a table or an HTML timeline.",
    ),
    "watch": (
        "runs:watch",
        "Show a run's progress live until it ends; piped, a line per change, then the result.",
    ),
    "logs": (
        "logs:logs",
        "Print what RUN's attempts printed (of TASK, of its --attempt N), secrets masked.",
    ),
    "cancel": ("runs:cancel", "Cancel a run: queued tasks never run, running ones are told to stop."),
    "resume": ("runs:resume", "Send again every task of RUN with a message on its way or a worker on it."),
    "approve": (
        "decide:approve",
        "Approve (or --reject) TASK of RUN, waiting at an approval gate "
        "(``--last TASK``: of the newest run).",
    ),
    "retry": (
        "decide:retry",
        "Run RUN's failed (or the named) tasks again, with fresh attempts, in the same run.",
    ),
    "runs": ("runs:runs_", "List runs, newest first."),
    "worker": ("fleet:worker", "Start a Celery worker of the fleet (prefork pool, so time limits work)."),
    "reconcile": (
        "fleet:reconcile_now",
        "Run one reconciler round now: lost stages, expired leases, due backoffs, restarted broker.",
    ),
    "db": ("fleet:db", "The result store's schema."),
    "schedule": ("schedule:schedule", "Recurring plans, fired by `taskexec beat`."),
    "beat": ("schedule:beat", "Run Celery beat on the schedules in the store (and the reconciler's rounds)."),
    "ui": ("ui:ui", "Serve the run dashboard: runs, tasks, attempts, gates and the fleet, live."),
    "flower": (
        "ops:flower",
        "Start Flower against the configured broker, showing taskexec's tasks with readable args.",
    ),
    "metrics": (
        "ops:metrics",
        "Serve the fleet's Prometheus metrics on http://ADDRESS:PORT/metrics until TERM or INT.",
    ),
}


def load(name: str) -> click.Command:
    """The command ``name``, its module imported now."""
    where, attribute = COMMANDS[name][0].split(":")
    command: click.Command = getattr(importlib.import_module(f"taskexec.cli.{where}"), attribute)
    return command


class _LazyGroup(click.Group):
    """A group that imports a command's module only to run (or show the help of) that command."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, _short(help_, limit)) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 3, 10)].rsplit(" ", 1)[0] + "..."


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(package_name="taskexec")
def main(debug: bool) -> None:
    """Plan-driven job execution on a Celery worker fleet."""


def __getattr__(name: str) -> Any:
    # `taskexec.cli.runs` and its kind, as attributes: imported on first use.
    if name in {where.split(":")[0] for where, _ in COMMANDS.values()}:
        return importlib.import_module(f"taskexec.cli.{name}")
    raise AttributeError(f"module 'taskexec.cli' has no attribute {name!r}")
