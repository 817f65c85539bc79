"""Handlers: the registry and the built-ins ``shell``, ``http``, ``stub`` (and ``python:``)."""

from workers.handlers.registry import (
    BUILTINS,
    Handler,
    HandlerContext,
    check_output,
    handler,
    load_modules,
    registered,
    resolve,
)

__all__ = [
    "BUILTINS",
    "Handler",
    "HandlerContext",
    "check_output",
    "handler",
    "load_modules",
    "registered",
    "resolve",
]
