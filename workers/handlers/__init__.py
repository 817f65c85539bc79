"""The worker's handlers: the built-ins ``shell``, ``http``, ``stub``, ``approval``, and the
lookup of any handler a task names (:mod:`workers.handlers.loading`).

The contract a handler is written against (``@handler``, ``HandlerContext``) is
:mod:`taskexec.handlers`; it is re-exported here for handler modules written against the
earlier layout (``from workers.handlers import handler``).
"""

from taskexec.handlers import HandlerContext, check_output, handler
from workers.handlers.loading import BUILTINS, load_modules, resolve

__all__ = ["BUILTINS", "HandlerContext", "check_output", "handler", "load_modules", "resolve"]
