"""Recurring plans: ``taskexec schedule add|list|remove|enable|disable`` and ``taskexec beat``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from taskexec.cli.common import labels as labels_of
from taskexec.cli.common import manifests, needs_fleet, params_options, user_errors, with_params
from taskexec.schedules import (
    Overlap,
    add_schedule,
    cron,
    every,
    list_schedules,
    remove_schedule,
    set_enabled,
)
from taskexec.settings import Settings
from taskexec.store import Store, database_url

__all__ = ["beat", "schedule"]


@contextmanager
def _store(settings: Settings) -> Iterator[Store]:
    needs_fleet(settings, "a schedule")
    store = Store.from_settings(settings)
    try:
        store.check()
        yield store
    finally:
        store.close()


@click.group()
def schedule() -> None:
    """Recurring plans, fired by `taskexec beat`."""


@schedule.command()
@click.argument("plan", type=click.Path(dir_okay=True))
@click.option("--cron", "cron_expr", metavar="EXPR", help='Cron expression in UTC, e.g. "*/15 * * * *".')
@click.option("--every", "every_", metavar="INTERVAL", help="Interval, e.g. 30s, 10m, 1h30m, 2d.")
@click.option(
    "--overlap",
    type=click.Choice(["skip", "allow"]),
    default="skip",
    show_default=True,
    help="skip: no new run while a run of this schedule is queued or running.",
)
@click.option("--variant", default=None, help="Submit only this variant (default: every variant).")
@click.option("--tenant", default=None, help="Tenant to record with the runs.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label the runs (repeatable).")
@click.option("--id", "schedule_id", default=None, help="The schedule's id (default: a random one).")
@params_options
@user_errors
def add(
    plan: str,
    cron_expr: str | None,
    every_: str | None,
    overlap: Overlap,
    variant: str | None,
    tenant: str | None,
    labels: tuple[str, ...],
    schedule_id: str | None,
    param_pairs: tuple[str, ...] = (),
    params_file: str | None = None,
) -> None:
    """Fire PLAN on a schedule; print the schedule's id. Its runs carry the label schedule=ID.

    The plan is compiled now, with its run parameters (--param, --params-file): an invalid
    plan or param is refused (exit 2), and later edits of the file do not change the
    schedule (remove it and add it again).
    """
    settings = Settings()
    seconds = every(every_) if every_ is not None else None
    if cron_expr is not None:
        cron(cron_expr)
    found = with_params(manifests(plan, settings, variant), param_pairs, params_file)
    label_map = labels_of(labels)
    with _store(settings) as store, store.begin() as s:
        info = add_schedule(
            s,
            found,
            cron_expr=cron_expr,
            every_seconds=seconds,
            overlap=overlap,
            tenant=tenant,
            labels=label_map,
            schedule_id=schedule_id,
        )
    click.echo(info.id)


@schedule.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@user_errors
def list_(as_json: bool) -> None:
    """List the schedules, oldest first, with what their last firing did."""
    with _store(Settings()) as store, store.begin() as s:
        found = list_schedules(s)
    if as_json:
        click.echo(json.dumps([f.model_dump(mode="json") for f in found], indent=2))
        return
    for f in found:
        last = f"{f.last_fired_at:%Y-%m-%d %H:%M:%S}" if f.last_fired_at else "never fired"
        state = "" if f.enabled else "  (disabled)"
        click.echo(
            f"{f.id}  {f.plan_id}  {f.trigger}  overlap={f.overlap}  "
            f"fired={f.fired} skipped={f.skipped}  last: {last}{state}"
        )


@schedule.command()
@click.argument("schedule_id", metavar="ID")
@user_errors
def remove(schedule_id: str) -> None:
    """Delete a schedule; its runs stay."""
    with _store(Settings()) as store, store.begin() as s:
        remove_schedule(s, schedule_id)
    click.echo(f"removed {schedule_id}")


@schedule.command()
@click.argument("schedule_id", metavar="ID")
@user_errors
def disable(schedule_id: str) -> None:
    """Stop firing a schedule, keeping it."""
    with _store(Settings()) as store, store.begin() as s:
        set_enabled(s, schedule_id, False)
    click.echo(f"disabled {schedule_id}")


@schedule.command()
@click.argument("schedule_id", metavar="ID")
@user_errors
def enable(schedule_id: str) -> None:
    """Fire a disabled schedule again."""
    with _store(Settings()) as store, store.begin() as s:
        set_enabled(s, schedule_id, True)
    click.echo(f"enabled {schedule_id}")


@click.command()
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@user_errors
def beat(loglevel: str) -> None:
    """Run Celery beat on the schedules in the store (and the reconciler's rounds).

    Start it on as many hosts as you like: one holds a Redis lock and fires, the others
    stand by and take over within TASKEXEC_BEAT_LOCK_SECONDS of its death. Stop it with TERM.
    """
    settings = Settings()
    needs_fleet(settings, "beat")
    database_url(settings)  # exit 2 now, not in a loop of beat's, when none is set
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "taskexec.celery_app",
        "beat",
        "-S",
        "taskexec.beat:DatabaseScheduler",
        "-l",
        loglevel,
    ]
    # exec: beat takes this process's pid, so TERM from a supervisor reaches Celery, which
    # releases the lock on its way out.
    os.execv(sys.executable, argv)
