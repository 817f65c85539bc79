"""Commands that change a run's course: ``approve`` (and reject) a gate, ``retry`` failed work."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from taskexec.cli.common import RunRef, fleet_or_embedded, make_client, run_argument, user_errors
from taskexec.errors import InvalidInputError
from taskexec.settings import Settings

if TYPE_CHECKING:
    from taskexec.client import Client

__all__ = ["approve", "retry"]


@click.command()
@run_argument
@click.argument("task_id", metavar="TASK", required=False)
@click.option(
    "--reject", is_flag=True, help="Reject instead: the task fails (E012), its dependents are skipped."
)
@click.option("--reason", default=None, help="Why, recorded with the decision.")
@click.option("--by", default=None, help="Who decides (default: user@host).")
@user_errors
def approve(run: RunRef, task_id: str | None, reject: bool, reason: str | None, by: str | None) -> None:
    """Approve (or --reject) TASK of RUN, waiting at an approval gate (``--last TASK``: of the
    newest run)."""
    if task_id is None and run.last and run.text is not None:
        run, task_id = RunRef(None, run.last, run.plan), run.text  # `approve --last TASK`
    if task_id is None:
        raise InvalidInputError("missing TASK: the id of the task waiting for approval", path="TASK")
    with make_client(fleet_or_embedded("approve")) as client:
        run_id = run.resolve(client)
        status = client.approve(run_id, task_id, reject=reject, reason=reason, by=by)
    click.echo(f"{run_id} {task_id}: {'rejected' if reject else 'approved'} ({status.value})")


@click.command()
@run_argument
@click.option("--task", "tasks", multiple=True, metavar="ID", help="Only these tasks (repeatable).")
@user_errors
def retry(run: RunRef, tasks: tuple[str, ...]) -> None:
    """Run RUN's failed (or the named) tasks again, with fresh attempts, in the same run.

    An embedded run that has ended is run again here: the embedded worker starts (as for
    ``taskexec run``) and the run is followed to its end (exit 0 when it succeeds).
    """
    settings = Settings()
    if settings.embedded:
        from taskexec.cli.runs import rerun_embedded
        from taskexec.embedded import attach

        if attach(settings) is None:

            def reopen(client: Client, run_id: str) -> str | None:
                reopened = client.retry(run_id, list(tasks) or None)
                if not reopened:
                    click.echo(f"{run_id}: nothing to run again")
                    return None
                return f"{run_id}: {len(reopened)} task(s) run again: {', '.join(reopened)}"

            rerun_embedded(run, settings, reopen)
    with make_client(fleet_or_embedded("retry")) as client:
        run_id = run.resolve(client)
        reopened = client.retry(run_id, list(tasks) or None)
    if reopened:
        click.echo(f"{run_id}: {len(reopened)} task(s) run again: {', '.join(reopened)}")
    else:
        click.echo(f"{run_id}: nothing to run again")
