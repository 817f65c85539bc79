"""Asking the embedded worker, over Celery's remote control, to stop consuming, what it
runs, and to shut down: what lets the embedded fleet stop in milliseconds when idle.

Why a warm stop takes about 1.7 s: a billiard pool process sleeps 1 s after reporting its
exit (``Worker._do_exit``) and Celery's prefork ``on_stop`` joins a timer thread that
sleeps 0.5 s at a time; neither is configurable. So the stop first has the worker cancel
its consumers and asks what it runs: running nothing, it is killed at once (what is left
in the queues dies with the private Redis either way). Otherwise it gets a warm stop. The
SIGTERM flag alone is read only when the worker's event loop next wakes, up to a second
later, so the stop also sends the ``shutdown`` control command (the same warm shutdown),
which wakes it at once.
"""

from __future__ import annotations

import logging

from taskexec.celery_app import QUEUES, close_app, create_app
from taskexec.settings import Settings

__all__ = ["broadcast_shutdown", "quiesced"]

log = logging.getLogger(__name__)


def quiesced(settings: Settings, worker: str) -> bool:
    """Stop ``worker`` consuming, then ask what it runs: true when nothing at all.

    Any doubt (Redis gone, no answer, an error) is false: the warm stop follows.
    """
    try:
        app = create_app(settings)
        try:
            where = [worker]
            for queue in QUEUES:
                if not app.control.cancel_consumer(queue, destination=where, reply=True, timeout=1.0):
                    return False
            active = app.control.inspect(destination=where, timeout=1.0).active() or {}
            return active.get(worker) == []
        finally:
            close_app(app)
    except Exception as e:
        log.debug("could not ask the worker what it runs: %s", e)
        return False


def broadcast_shutdown(settings: Settings, worker: str) -> None:
    """Send ``worker`` the ``shutdown`` control command (a warm shutdown, at once)."""
    try:
        app = create_app(settings)
        try:
            app.control.shutdown(destination=[worker])
        finally:
            close_app(app)
    except Exception as e:  # the SIGTERM already sent does the same, only later
        log.debug("shutdown broadcast failed: %s", e)
