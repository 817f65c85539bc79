"""The run dashboard (``taskexec ui``): every run, task, attempt and gate in a web page, live.

:mod:`~taskexec.ui.app` (the ASGI app: pages, ``/api/v1``, Server-Sent Events),
:mod:`~taskexec.ui.board` (what pages and API read and do), :mod:`~taskexec.ui.hub` (one
Redis subscription fanned out to open pages), :mod:`~taskexec.ui.layout` (the graph's and
timeline's geometry), :mod:`~taskexec.ui.fleet` (workers, queues, schedules),
:mod:`~taskexec.ui.security` (bind check, auth, CSRF), :mod:`~taskexec.ui.server` (uvicorn).
Imported only by the ``ui`` command and by callers that serve it: the CLI starts without
the ASGI stack.
"""

from taskexec.ui.app import create_app
from taskexec.ui.server import dashboard_for, serve, serve_in_background

__all__ = ["create_app", "dashboard_for", "serve", "serve_in_background"]
