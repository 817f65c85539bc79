"""The runs an embedded fleet leaves behind when it stops: cancelled first (running
handlers see the flag and return), then, once no worker is left to run them, ended as
their stop says when nothing was left running (``cancelled``, ``timed_out``), else
``error``, in the store, which outlives the fleet."""

from __future__ import annotations

import logging

from taskexec.models import RunStatus
from taskexec.settings import Settings
from taskexec.store import Store
from taskexec.store import repository as repo

__all__ = ["abandon_unfinished", "cancel_unfinished"]

log = logging.getLogger(__name__)


def _unfinished(store: Store, runs: list[str]) -> list[str]:
    with store.begin() as s:
        return [r for r in runs if not RunStatus(repo.get_run(s, r).status).terminal]


def cancel_unfinished(settings: Settings, runs: list[str]) -> None:
    """Cancel those of ``runs`` that have not ended."""
    from taskexec.client import Client

    with Client(settings) as client:
        try:
            for run_id in _unfinished(client.store, runs):
                client.cancel(run_id)
        except Exception as e:  # the stop must go on whatever the store or Redis say
            log.warning("could not cancel the unfinished runs: %s", e)


def abandon_unfinished(settings: Settings, runs: list[str], reason: str) -> dict[str, RunStatus] | None:
    """End ``error`` those of ``runs`` still unfinished; every run's final status (``None``
    when the store could not be read)."""
    from taskexec.celery_app import close_app, create_app
    from taskexec.run.lifecycle import abandon, finalize, stop_waiting
    from taskexec.services import Services

    store = Store(settings.database_url or "")
    app = create_app(settings)
    try:
        svc = Services(settings, app, store, None)  # its Redis is gone or going
        for run_id in _unfinished(store, runs):
            # A stopped run (cancel, timeout) ends as its stop says when what is left only
            # waited: a gate that opened after the cancel (its attempt ran meanwhile), a task
            # queued for a worker that is gone. Only what a worker held ends it ``error``.
            with store.begin() as s:
                stop = repo.stop_reason(s, run_id)
                if stop is not None:
                    stop_waiting(s, run_id, stop)
            if stop is not None:
                finalize(svc, run_id)
        for run_id in _unfinished(store, runs):
            abandon(svc, run_id, f"{reason}; the run cannot go on")
        with store.begin() as s:
            return {r: RunStatus(repo.get_run(s, r).status) for r in runs}
    except Exception as e:
        log.warning("could not settle the unfinished runs: %s", e)
        return None
    finally:
        store.dispose()
        close_app(app)
