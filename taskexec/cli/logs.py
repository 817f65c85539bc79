"""``taskexec logs RUN [TASK] [--attempt N] [--follow] [--json]``: what attempts printed."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from taskexec.cli.common import RunRef, make_client, run_argument, user_errors
from taskexec.errors import InvalidInputError
from taskexec.models import AttemptLog
from taskexec.settings import Settings
from taskexec.store import repository as repo

if TYPE_CHECKING:
    from taskexec.client import Client

__all__ = ["logs"]


@click.command()
@run_argument
@click.argument("task_id", metavar="[TASK]", required=False)
@click.option("--attempt", type=click.IntRange(min=1), default=None, help="Only this attempt (from 1).")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Go on printing what running attempts print, until the task (without TASK, the run) ends.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line per record (JSON Lines).")
@user_errors
def logs(run: RunRef, task_id: str | None, attempt: int | None, follow: bool, as_json: bool) -> None:
    """Print what RUN's attempts printed (of TASK, of its --attempt N), secrets masked.

    Each attempt keeps its streams: stdout and stderr of a shell step, the status line and
    the start of the body of an http request, the exception a handler raised with its
    traceback, and what it logged through ctx.logger (``log``). Ended attempts are read
    from the store; with --follow, running ones are printed as they go, and the command
    ends when the task (without TASK, the run) has ended. ``--last TASK``: of the newest
    run.
    """
    from taskexec import logs as attempt_logs

    if task_id is None and run.last and run.text is not None:
        run, task_id = RunRef(None, run.last, run.plan), run.text  # `logs --last TASK`
    settings = Settings()
    if follow and settings.embedded:  # the `taskexec run` in progress under home, if there is one
        from taskexec.embedded import attach

        settings = attach(settings) or settings
    view = attempt_logs.TextView()

    def show(entry: AttemptLog) -> None:
        click.echo(entry.model_dump_json() if as_json else view.text(entry), nl=as_json)

    with make_client(settings) as client:
        run_id = run.resolve(client)
        try:
            if follow:
                for entry in attempt_logs.follow(client, run_id, task_id, attempt):
                    show(entry)
            else:
                found = client.logs(run_id, task_id, attempt)
                if attempt is not None and task_id is not None and not found:
                    _no_such_attempt(client, run_id, task_id, attempt)
                for entry in found:
                    show(entry)
                if not found:
                    of = f"task {task_id!r} of " if task_id is not None else ""
                    which = f"attempt {attempt} of " if attempt is not None else ""
                    click.echo(f"taskexec: no logs stored for {which}{of}run {run_id} (yet)", err=True)
        except KeyboardInterrupt:
            click.echo(view.end(), nl=False)
            click.echo(f"taskexec: stopped following {run_id}; the run goes on", err=True)
            sys.exit(130)
    if not as_json:
        click.echo(view.end(), nl=False)


def _no_such_attempt(client: Client, run_id: str, task_id: str, attempt: int) -> None:
    """Say so when ``attempt`` is past the task's attempts (E001); an attempt that printed
    nothing has no logs, and that is no error."""
    with client.store.begin() as s:
        made = repo.task_state(s, run_id, task_id).attempts
    if attempt > made:
        raise InvalidInputError(
            f"task {task_id!r} of run {run_id} has made {made} attempt(s), not {attempt}", path="--attempt"
        )
