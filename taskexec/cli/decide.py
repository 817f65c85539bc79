"""Commands that change a run's course: ``approve`` (and reject) a gate, ``retry`` failed work."""

from __future__ import annotations

import click

from taskexec.cli.common import fleet_or_embedded, make_client, user_errors

__all__ = ["approve", "retry"]


@click.command()
@click.argument("run_id", metavar="RUN")
@click.argument("task_id", metavar="TASK")
@click.option(
    "--reject", is_flag=True, help="Reject instead: the task fails (E012), its dependents are skipped."
)
@click.option("--reason", default=None, help="Why, recorded with the decision.")
@click.option("--by", default=None, help="Who decides (default: user@host).")
@user_errors
def approve(run_id: str, task_id: str, reject: bool, reason: str | None, by: str | None) -> None:
    """Approve (or --reject) TASK of RUN, waiting at an approval gate."""
    with make_client(fleet_or_embedded("approve")) as client:
        status = client.approve(run_id, task_id, reject=reject, reason=reason, by=by)
    click.echo(f"{run_id} {task_id}: {'rejected' if reject else 'approved'} ({status.value})")


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--task", "tasks", multiple=True, metavar="ID", help="Only these tasks (repeatable).")
@user_errors
def retry(run_id: str, tasks: tuple[str, ...]) -> None:
    """Run RUN's failed (or the named) tasks again, with fresh attempts, in the same run."""
    with make_client(fleet_or_embedded("retry")) as client:
        reopened = client.retry(run_id, list(tasks) or None)
    if reopened:
        click.echo(f"{run_id}: {len(reopened)} task(s) run again: {', '.join(reopened)}")
    else:
        click.echo(f"{run_id}: nothing to run again")
