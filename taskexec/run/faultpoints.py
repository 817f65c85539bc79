"""Fault points: the places between a commit and a publish where the fault suite strikes.

Every step of taskexec commits to the store, then publishes (a Celery message, a retry, a
chord). A process that dies between the two must lose nothing: the fault suite proves it
by killing a real process at each of these points (``tests/faults``). A point is a call to
:func:`reached`; it costs one global lookup unless ``TASKEXEC_FAULTPOINTS`` names a
directory, which no deployment sets.

In that directory, a file named after a point arms it once. Its content is the action:
``kill`` (SIGKILL of the process that reached it) or ``stall SECONDS`` (sleep there, so a
test can restart a service at that moment). The first process to reach an armed point
renames the file to ``NAME.fired`` (atomic, so exactly one process fires it), writes its
pid there, then acts.

Points:

=========================  ==============================================================
``submit.committed``       the run and its tasks are stored; the dispatch message is not sent
``dispatch.committed``     a stage's tasks are ``queued`` (in the outbox); the chord is not sent
``dispatch.published``     the chord is sent; the outbox is not cleared
``execute.claimed``        an attempt is claimed (``running``, leased); the handler has not run
``execute.delayed``        a wait (backoff, token, slot) is stored; its Celery retry is not sent
``execute.settled``        a task's outcome is stored; the message is not acknowledged
``validate.delayed``       a re-execution after failed criteria is stored; it is not sent
``decide.committed``       an approval is stored; the release message is not sent
``resume.committed``       a resume is stored (new epoch); its messages are not sent
``reconcile.marked``       the reconciler marked overdue tasks to send again; not yet sent
=========================  ==============================================================
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["POINTS", "reached"]

POINTS = (
    "submit.committed",
    "dispatch.committed",
    "dispatch.published",
    "execute.claimed",
    "execute.delayed",
    "execute.settled",
    "validate.delayed",
    "decide.committed",
    "resume.committed",
    "reconcile.marked",
)

_DIR = os.environ.get("TASKEXEC_FAULTPOINTS") or None


def reached(name: str) -> None:
    """Strike here if the fault suite armed ``name`` (a no-op in every deployment)."""
    if _DIR is not None:
        _strike(Path(_DIR), name)


def _strike(folder: Path, name: str) -> None:
    armed, fired = folder / name, folder / f"{name}.fired"
    try:
        armed.rename(fired)  # one process wins the rename; the others find nothing armed
    except OSError:
        return
    action = fired.read_text().split()
    fired.write_text(f"{' '.join(action)}\n{os.getpid()}\n")
    if action[:1] == ["stall"]:
        time.sleep(float(action[1]) if len(action) > 1 else 3.0)
        return
    os.kill(os.getpid(), signal.SIGKILL)
