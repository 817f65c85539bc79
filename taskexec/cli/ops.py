"""Watching a fleet: ``taskexec flower`` (Flower on the configured broker) and ``taskexec metrics``.

Flower shows everything the fleet does and can act on it (revoke, shut workers down),
so ``taskexec flower`` refuses to listen beyond loopback without authentication.
"""

from __future__ import annotations

import ast
import ipaddress
import os
import re
import signal
import threading
from typing import Any

import click

from taskexec.cli.common import needs_fleet, user_errors
from taskexec.errors import InvalidInputError
from taskexec.settings import Settings

__all__ = ["COMMANDS", "flower", "flower_argv", "flower_task_format", "is_loopback", "metrics"]

#: Columns of Flower's tasks page: our args are ids (``task=… run=…``), never params.
TASK_COLUMNS = "name,args,state,received,runtime,worker,uuid"

#: How often persistent Flower writes its state file (ms): a crash loses at most this much.
STATE_SAVE_INTERVAL_MS = 60_000

#: Where the basic-auth credentials come from, first found wins; Flower's own name last.
BASIC_AUTH_ENV = ("TASKEXEC_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH")


def is_loopback(address: str) -> bool:
    """Whether ``address`` only accepts connections from this host.

    ``""`` and ``0.0.0.0`` mean every interface, and a host name may resolve anywhere:
    neither is loopback.

    >>> [is_loopback(a) for a in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "")]
    [True, True, True, False, False]
    """
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_basic_auth(value: str) -> None:
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise InvalidInputError(
                "basic auth is user:password[,user:password…] with both parts non-empty",
                path="TASKEXEC_FLOWER_BASIC_AUTH",
            )


def flower_argv(
    port: int,
    address: str,
    *,
    state_file: str | None = None,
    url_prefix: str | None = None,
    read_only: bool = False,
    max_tasks: int | None = None,
) -> list[str]:
    """Arguments of ``celery`` that start Flower for the fleet (credentials never among them)."""
    argv = [
        "-A",
        "taskexec.celery_app",
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--tasks_columns={TASK_COLUMNS}",
    ]
    if state_file:
        argv += ["--persistent=True", f"--db={state_file}", f"--state_save_interval={STATE_SAVE_INTERVAL_MS}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    if read_only:
        argv.append("--read_only=True")
    if max_tasks:
        argv.append(f"--max_tasks={max_tasks}")
    return argv


def flower_task_format(task: Any) -> Any:
    """Flower's ``format_task``: our tasks' arguments as ids, what tells them apart first.

    Flower's pages cut the args column to its width, so ``task=score[3] run=<run id>``
    (or ``stage=2 run=…``) rather than the ``run=… task=…`` of the messages: the cut falls
    on the tail of the run id. Searching still matches the messages' own args. Celery's
    re-sends (a retry of ``execute``, the ``validate`` link that receives ``execute``'s
    record, the ``stage_failed`` errback) carry raw tuples, rewritten the same way.
    """
    name, args = getattr(task, "name", None), getattr(task, "args", None)
    if name not in _ARG_NAMES or not isinstance(args, str):
        return task
    key = _ARG_NAMES[name]
    found = re.fullmatch(rf"run=(\S+) {key}=(.+)", args)
    if found:
        run, value = found.groups()
    else:
        try:
            parsed = ast.literal_eval(args)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return task
        if not isinstance(parsed, (tuple, list)) or not parsed:
            return task
        if isinstance(parsed[0], dict):  # validate: the record execute returned
            parsed = (parsed[0].get("run_id"), parsed[0].get("task_id"))
        if len(parsed) != 2:
            return task
        run, value = parsed
    task.args = f"{key}={value} run={run}"
    return task


#: Our tasks' names -> what their second argument is.
_ARG_NAMES = {
    "taskexec.execute": "task",
    "taskexec.validate": "task",
    "taskexec.dispatch": "stage",
    "taskexec.advance": "stage",
    "taskexec.stage_failed": "stage",
}


def _start_line(port: int, address: str, url_prefix: str | None, *, basic: bool) -> str:
    """Where Flower listens and who may use it: a plain start serves its pages to anyone who
    reaches it, while its API (``/api/*``) answers 401 until authentication is set."""
    host = address or "0.0.0.0"
    prefix = "/" + url_prefix.strip("/") + "/" if url_prefix and url_prefix.strip("/") else "/"
    where = f"http://{host}:{port or '<a free port>'}{prefix}"
    if basic:
        who = "basic auth required for its pages and its API (/api/*)"
    elif os.environ.get("FLOWER_AUTH"):
        who = "FLOWER_AUTH's login required for its pages and its API (/api/*)"
    elif os.environ.get("FLOWER_UNAUTHENTICATED_API", "").lower() in ("1", "true", "yes"):
        who = "no authentication: its pages and its API (/api/*) are open to whoever reaches it"
    else:
        who = (
            "pages without authentication; its API (/api/*) answers 401 until "
            "TASKEXEC_FLOWER_BASIC_AUTH=user:password is set (or FLOWER_UNAUTHENTICATED_API=true)"
        )
    return f"taskexec flower: listening on {where} ({who})"


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=5555, show_default=True)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on; anything but loopback needs authentication.",
)
@click.option(
    "--basic-auth",
    envvar=list(BASIC_AUTH_ENV),
    show_envvar=True,
    default=None,
    help="user:password[,user:password…]. Prefer the environment variable: options show in the process list.",
)
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Persistent mode: keep the task history in this file across restarts.",
)
@click.option("--url-prefix", default=None, help="Serve under this path (behind a reverse proxy).")
@click.option("--read-only", is_flag=True, help="Disable Flower's actions (revoke, shutdown, pool changes).")
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="Tasks kept in memory.")
@click.option(
    "--unauthenticated",
    is_flag=True,
    help="Listen beyond loopback without authentication: only behind a proxy that authenticates.",
)
@user_errors
def flower(
    port: int,
    address: str,
    basic_auth: str | None,
    state_file: str | None,
    url_prefix: str | None,
    read_only: bool,
    max_tasks: int | None,
    unauthenticated: bool,
) -> None:
    """Start Flower against the configured broker, showing taskexec's tasks with readable args.

    Flower's own ``/metrics`` (Prometheus) and ``/healthcheck`` stay available.
    """
    needs_fleet(Settings(), "Flower")
    if basic_auth:
        _check_basic_auth(basic_auth)
    authenticated = bool(basic_auth or os.environ.get("FLOWER_AUTH"))
    if not authenticated and not is_loopback(address):
        if not unauthenticated:
            raise InvalidInputError(
                f"Flower would serve the fleet on {address or 'every interface'} to anyone: "
                "set TASKEXEC_FLOWER_BASIC_AUTH=user:password, or listen on 127.0.0.1",
                path="--address",
            )
        click.secho(
            f"taskexec: WARNING: Flower serves {address or 'every interface'}:{port} WITHOUT "
            "authentication; anyone who reaches it can revoke tasks and shut workers down",
            err=True,
            fg="red",
            bold=True,
        )
    if basic_auth:
        # Through the environment, never argv: Flower reads FLOWER_BASIC_AUTH itself.
        os.environ["FLOWER_BASIC_AUTH"] = basic_auth
    argv = flower_argv(
        port, address, state_file=state_file, url_prefix=url_prefix, read_only=read_only, max_tasks=max_tasks
    )
    # In this process rather than exec'd: format_task is a function, which Flower takes
    # only from its options object (or a config file of Python code, which we avoid).
    from celery.bin.celery import celery as celery_command
    from flower.options import options as flower_options

    flower_options.format_task = flower_task_format
    # Flower repeats enable_events every 5 s from its start; the workers already up are
    # asked now, so that Flower sees their tasks from the first one.
    from taskexec.celery_app import app, enable_task_events

    try:
        enable_task_events(app, wait=1.0)
    except Exception as e:  # the broker is away: Flower reports it, and asks again itself
        click.echo(f"taskexec flower: enable_events broadcast failed: {e}", err=True)
    click.echo(_start_line(port, address, url_prefix, basic=bool(basic_auth)))
    celery_command.main(args=argv, prog_name="taskexec flower", auto_envvar_prefix="CELERY")


@click.command()
@click.option(
    "--port", type=click.IntRange(0, 65535), default=9808, show_default=True, help="0: a free port."
)
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@user_errors
def metrics(port: int, address: str) -> None:
    """Serve the fleet's Prometheus metrics on http://ADDRESS:PORT/metrics until TERM or INT."""
    from prometheus_client import disable_created_metrics

    from taskexec.metrics import Exporter, serve
    from taskexec.run.producer import check_broker

    settings = Settings()
    needs_fleet(settings, "taskexec metrics")
    # The *_created series double what is scraped for nothing a dashboard uses.
    disable_created_metrics()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    exporter = Exporter(settings)
    try:
        check_broker(exporter.broker)
    except Exception:
        exporter.stop()
        raise

    def ready(addr: str, bound: int) -> None:
        click.echo(f"taskexec metrics: serving http://{addr}:{bound}/metrics")

    try:
        serve(exporter, port, address, stop=stop, ready=ready)
    except OSError as e:  # the port is taken, or the address is not this host's
        raise InvalidInputError(f"cannot listen on {address}:{port}: {e}", path="--port") from e


#: The commands this module adds to ``taskexec``.
COMMANDS = (flower, metrics)
