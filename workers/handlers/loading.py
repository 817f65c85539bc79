"""Where a worker finds the handler a task names, and whether it may run it.

Lookup of a name, in order: handlers registered with :func:`taskexec.handlers.handler`
(the built-ins, imported on first use, and the operator's modules named by
``TASKEXEC_HANDLER_MODULES``), entry points of the group ``taskexec.handlers``, then
``python:module:function``. Only names the operator allows (``TASKEXEC_ALLOWED_HANDLERS``)
are ever looked up: a plan never brings code of its own.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from taskexec.errors import HandlerNotAllowedError
from taskexec.handlers import Handler, registered
from taskexec.settings import Settings

__all__ = ["BUILTINS", "load_modules", "resolve"]

#: Built-in handler name -> module that registers it (imported on first use).
BUILTINS = {
    "shell": "workers.handlers.shell",
    "http": "workers.handlers.http",
    "stub": "workers.handlers.stub",
    "approval": "workers.handlers.approval",
}

#: Handlers found through entry points, by name: scanning the installed distributions
#: takes milliseconds, and a task resolves its handler on every delivery.
_from_packages: dict[str, Handler] = {}


def _from_entry_points(name: str) -> Handler | None:
    if name in _from_packages:
        return _from_packages[name]
    for ep in entry_points(group="taskexec.handlers", name=name):
        fn: Handler = ep.load()
        _from_packages[name] = fn
        return fn
    return None


def _from_python(name: str) -> Handler:
    try:
        _, module, attr = name.split(":")
    except ValueError:
        raise HandlerNotAllowedError(f"{name!r} is not python:module:function") from None
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise HandlerNotAllowedError(f"handler {name!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise HandlerNotAllowedError(f"handler {name!r} is not callable")
    found: Handler = fn
    return found


def resolve(name: str, settings: Settings) -> Handler:
    """The function of an allowed handler.

    Raises:
        HandlerNotAllowedError: The operator does not allow ``name``, or it is not found (E010).
    """
    if not settings.handler_allowed(name):
        raise HandlerNotAllowedError(f"handler {name!r} is not allowed on this worker")
    if name.startswith("python:"):
        return _from_python(name)
    known = registered()
    if name not in known and name in BUILTINS:
        importlib.import_module(BUILTINS[name])
        known = registered()
    fn = known.get(name) or _from_entry_points(name)
    if fn is None:
        raise HandlerNotAllowedError(
            f"handler {name!r} is allowed but not registered on this worker "
            "(TASKEXEC_HANDLER_MODULES, or an entry point in group taskexec.handlers)"
        )
    return fn


def load_modules(settings: Settings) -> None:
    """Import the operator's handler modules (``TASKEXEC_HANDLER_MODULES``) so they register."""
    for module in settings.handler_modules:
        importlib.import_module(module)
