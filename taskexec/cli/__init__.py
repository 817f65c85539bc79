"""The ``taskexec`` command (contract: shared/CLI.md).

Exit codes: 0 success, 1 a run finished and some task did not succeed, 2 invalid input,
3 a service is unreachable. Errors are one line on stderr naming their code; a traceback
only with ``--debug``. One module per group of commands: :mod:`~taskexec.cli.plans`
(validate, compile), :mod:`~taskexec.cli.runs` (run, submit, status, results, watch,
cancel, resume, runs), :mod:`~taskexec.cli.logs` (logs), :mod:`~taskexec.cli.fleet` (worker, db),
:mod:`~taskexec.cli.ui` (ui).
"""

from __future__ import annotations

import click

from taskexec.cli import decide, fleet, logs, ops, plans, runs, schedule, ui

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(package_name="taskexec")
def main(debug: bool) -> None:
    """Plan-driven job execution on a Celery worker fleet."""


for command in (
    plans.validate,
    plans.compile_,
    runs.run,
    runs.submit,
    runs.status,
    runs.results,
    runs.watch,
    logs.logs,
    runs.cancel,
    runs.resume,
    decide.approve,
    decide.retry,
    runs.runs_,
    fleet.worker,
    fleet.reconcile_now,
    fleet.db,
    schedule.schedule,
    schedule.beat,
    ui.ui,
    *ops.COMMANDS,
):
    main.add_command(command)
