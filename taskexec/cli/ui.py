"""``taskexec ui``: serve the run dashboard (the ASGI stack is imported only here, when run)."""

from __future__ import annotations

import click

from taskexec.cli.common import user_errors
from taskexec.settings import Settings

__all__ = ["ui"]


@click.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (not loopback: auth needed)."
)
@click.option(
    "--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one)."
)
@click.option(
    "--read-only", is_flag=True, help="Hide and refuse every action (cancel, retry, resume, approve)."
)
@user_errors
def ui(host: str, port: int, read_only: bool) -> None:
    """Serve the run dashboard: runs, tasks, attempts, gates and the fleet, live.

    Without TASKEXEC_BROKER_URL it shows the embedded `taskexec run` in progress under
    TASKEXEC_HOME, or the runs stored there. Another address than loopback needs
    TASKEXEC_UI_AUTH=user:password or TASKEXEC_UI_TOKENS=token=tenant,...
    """
    from taskexec.ui.server import serve

    def ready(url: str) -> None:
        click.echo(f"taskexec dashboard: {url}" + ("  (read-only)" if read_only else ""), err=False)

    serve(Settings(), host, port, read_only=read_only, on_ready=ready)
