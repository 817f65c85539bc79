"""Full garbage collections held back while many objects are built at once (a plan, its
manifests): ``with full_collections_held:``.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["full_collections_held"]


class _FullCollectionsHeld:
    """Holds back CPython's full garbage collections while a plan or its manifests are built.

    Loading and compiling a 100k-task plan makes well over a million container objects
    (models, their dicts and lists) in one go. CPython runs a full collection, which walks
    every live container, each time the objects that survived the young generations reach a
    quarter of the heap: ten of them here, over a heap that no longer fits in the CPU cache.
    They took two thirds of the time (6.3 s of 9.5 s, measured) and made it grow faster than
    the plan. Young collections still run (cheap: recent objects, in cache); the threshold
    comes back when the build ends, and the next full collection walks the new objects once,
    as it does for any long-lived data. Nothing is left uncollected.

    Rejected: ``gc.disable()``. The first collections after it walk the whole build cold,
    as the young and then the middle generation, before the full one: slower in total,
    measured. Concurrent builds nest: the first saves the threshold, the last restores it
    (under a lock, so that no build saves another's raised value as the one to restore).
    """

    _NO_FULL = 1 << 30  # a gen-2 threshold that is never reached

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                young, middle, self._saved = gc.get_threshold()
                gc.set_threshold(young, middle, self._NO_FULL)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                young, middle, _ = gc.get_threshold()
                gc.set_threshold(young, middle, self._saved)


#: ``with full_collections_held:`` around building many objects at once.
full_collections_held = _FullCollectionsHeld()
