"""Serving the dashboard with uvicorn: in the foreground (``taskexec ui``) or in a thread
beside an embedded run (:func:`serve_in_background`, for ``taskexec run --ui``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis as redis_lib
import uvicorn

from taskexec.celery_app import redis_url
from taskexec.client import Client
from taskexec.errors import ServiceUnavailableError
from taskexec.services import Services
from taskexec.settings import Settings
from taskexec.store import Store, upgrade
from taskexec.ui.app import create_app
from taskexec.ui.board import Board
from taskexec.ui.hub import EventHub
from taskexec.ui.security import Auth, check_bind

__all__ = ["Dashboard", "dashboard_for", "serve", "serve_in_background"]

#: Seconds uvicorn has to start listening before the start counts as failed.
START_TIMEOUT = 15.0
#: Seconds open requests (event streams) get to end when the server stops.
GRACE = 3


@dataclass
class Dashboard:
    """A board, its event hub and what to close after serving them."""

    board: Board
    hub: EventHub
    closers: list[Callable[[], None]]

    def close(self) -> None:
        """Close the hub, the board's client and whatever this dashboard opened."""
        self.hub.close()
        self.board.close()
        for close in reversed(self.closers):
            close()


def dashboard_for(settings: Settings) -> Dashboard:
    """The dashboard of the configured fleet; without one, of an embedded ``taskexec run`` in
    progress under ``TASKEXEC_HOME``; without that, of the store alone (no actions, no live
    updates)."""
    if settings.embedded:
        from taskexec.embedded import attach

        attached = attach(settings)
        if attached is None:
            store = Store.from_settings(settings)
            upgrade(store)  # embedded mode owns its SQLite file: a fresh home is an empty store
            return Dashboard(Board(settings, store, None), EventHub(None), [store.close])
        settings = attached
    client = Client(settings)
    client.store.check()
    events = redis_lib.Redis.from_url(redis_url(settings), socket_connect_timeout=5)
    try:
        events.ping()
    except (redis_lib.RedisError, OSError) as e:
        events.close()
        client.close()
        raise ServiceUnavailableError(f"cannot reach the broker's Redis: {e}") from e
    return Dashboard(Board(settings, client.store, client), EventHub(events), [events.close])


def _server(dash: Dashboard, host: str, port: int, read_only: bool, auth: Auth) -> uvicorn.Server:
    app = create_app(dash.board, dash.hub, auth=auth, read_only=read_only)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        access_log=False,
        # Open event streams never end on their own: a stop must not wait for the browsers.
        timeout_graceful_shutdown=GRACE,
    )
    return uvicorn.Server(config)


def serve(
    settings: Settings, host: str, port: int, *, read_only: bool, on_ready: Callable[[str], None]
) -> None:
    """Serve the dashboard until interrupted (``taskexec ui``).

    Raises:
        InvalidInputError: A non-loopback ``host`` without auth, or bad auth settings (E001).
    """
    auth = Auth.from_settings(settings)
    check_bind(host, auth)
    dash = dashboard_for(settings)
    try:
        server = _server(dash, host, port, read_only, auth)
        thread = threading.Thread(target=_announce, args=(server, host, on_ready), daemon=True)
        thread.start()
        server.run()
    finally:
        dash.close()


def _announce(server: uvicorn.Server, host: str, on_ready: Callable[[str], None]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started and time.monotonic() < deadline and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        on_ready(_url(server, host))


def _url(server: uvicorn.Server, host: str) -> str:
    port = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve_in_background(
    services: Services, host: str = "127.0.0.1", port: int = 0, *, read_only: bool = False
) -> tuple[str, Callable[[], None]]:
    """Serve the dashboard of ``services`` (an embedded fleet's, say) from a thread.

    Returns ``(url, stop)``: the dashboard's address (``port=0`` picks a free one) and a
    function that stops the server and closes what it opened; the services stay open.

    Example:
        >>> url, stop = serve_in_background(client.services)  # doctest: +SKIP
        >>> print(f"dashboard: {url}")                        # doctest: +SKIP
        >>> stop()                                            # doctest: +SKIP

    Raises:
        InvalidInputError: A non-loopback ``host`` without auth (E001).
        ServiceUnavailableError: The server did not start.
    """
    auth = Auth.from_settings(services.settings)
    check_bind(host, auth)
    events = services.redis
    dash = Dashboard(Board.of(services), EventHub(events), [])
    server = _server(dash, host, port, read_only, auth)
    thread = threading.Thread(target=server.run, name="taskexec-ui", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        thread.join(timeout=5)
        dash.close()
        raise ServiceUnavailableError(f"the dashboard did not start on {host}:{port}")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        dash.close()

    return _url(server, host), stop
