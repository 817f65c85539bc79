"""Operating a fleet: ``taskexec worker`` and ``taskexec db upgrade``."""

from __future__ import annotations

import os
import sys

import click

from taskexec.cli.common import make_client, needs_fleet, user_errors
from taskexec.errors import InvalidInputError
from taskexec.settings import Settings

__all__ = ["db", "reconcile_now", "worker"]


@click.command()
@click.option(
    "--queues",
    "-Q",
    default="executor,validator",
    show_default=True,
    help="Comma-separated queues to consume (control is always added).",
)
@click.option("--concurrency", "-c", type=int, default=None, help="Pool processes (default: CPU count).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker node name (default: taskexec-<queues>@host).")
@click.option(
    "--reconcile/--no-reconcile",
    default=True,
    show_default=True,
    help="Send reconciler rounds (one per interval fleet-wide, whatever the number of workers).",
)
@user_errors
def worker(
    queues: str, concurrency: int | None, loglevel: str, hostname: str | None, reconcile: bool
) -> None:
    """Start a Celery worker of the fleet (prefork pool, so time limits work)."""
    from taskexec.celery_app import CONTROL, QUEUES, worker_argv

    settings = Settings()
    needs_fleet(settings, "a fleet worker")
    for warning in exposure_warnings(settings):
        click.echo(f"taskexec: warning: {warning}", err=True)
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    for q in wanted:
        if q not in QUEUES:
            raise InvalidInputError(f"unknown queue {q!r} (queues: {', '.join(QUEUES)})", path="--queues")
    if CONTROL not in wanted:
        wanted.append(CONTROL)
    argv = worker_argv(
        wanted,
        name=hostname or f"taskexec-{'-'.join(wanted)}@%h",
        concurrency=concurrency or settings.worker_concurrency,
        loglevel=loglevel,
        reconcile=reconcile,
    )
    # exec: the worker takes this process's pid, so TERM from a supervisor reaches Celery.
    os.execv(sys.executable, argv)


def exposure_warnings(settings: Settings) -> list[str]:
    """What an operator should know before a worker starts: services open to the network."""
    from urllib.parse import urlsplit

    out = []
    for name, url in (("broker", settings.broker_url), ("Redis", settings.redis_url)):
        if not url or url.startswith(("redis+socket://", "unix://")):
            continue
        parts = urlsplit(url)
        loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
        if not loopback and not parts.password:
            out.append(
                f"the {name} {parts.hostname}:{parts.port or 6379} has no password: anyone who reaches it "
                "can read and send task messages (set one: redis://:PASSWORD@host/0)"
            )
    return out


@click.command(name="reconcile")
@user_errors
def reconcile_now() -> None:
    """Run one reconciler round now: lost stages, expired leases, due backoffs, restarted broker."""
    from taskexec.run.reconcile import reconcile

    settings = Settings()
    needs_fleet(settings, "reconcile")
    with make_client(settings) as client:
        report = reconcile(client.services, grace=settings.resend_grace)
    click.echo(
        f"resumed {len(report.resumed)} run(s), advanced {len(report.advanced)}, "
        f"stopped {len(report.stopped)}, re-sent {len(report.requeued)} task(s)"
    )


@click.group()
def db() -> None:
    """The result store's schema."""


@db.command()
@user_errors
def upgrade() -> None:
    """Apply the Alembic migrations to TASKEXEC_DATABASE_URL."""
    from taskexec.store import Store
    from taskexec.store import upgrade as upgrade_store

    store = Store.from_settings(Settings())
    upgrade_store(store)
    click.echo(f"{store.engine.url.render_as_string()}: schema up to date")
