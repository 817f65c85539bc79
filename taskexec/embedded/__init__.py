"""Zero-setup mode: ``taskexec run PLAN`` with no broker runs on a private Redis, a SQLite
store and a local Celery worker (:mod:`~taskexec.embedded.fleet`); another command finds a
fleet in progress (:mod:`~taskexec.embedded.discovery`); its processes are marked and
stopped with it (:mod:`~taskexec.embedded.processes`)."""

from taskexec.embedded.discovery import attach, live_socket
from taskexec.embedded.fleet import EmbeddedFleet
from taskexec.embedded.processes import Interrupted, interrupt_on_signals, marked_processes

__all__ = [
    "EmbeddedFleet",
    "Interrupted",
    "attach",
    "interrupt_on_signals",
    "live_socket",
    "marked_processes",
]
