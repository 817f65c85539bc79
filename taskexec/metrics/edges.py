"""Edge latency of a ``dag`` run: how long a task waited after its last upstream task ended.

In ``execution: dag`` a task is released by the end of its last upstream task; the time
from that end (``finished_at``) to the task's start (``started_at``, its first claim) is
what the release costs: the transaction, the publish, the broker, a worker's pick-up. It
is ``stage gap``'s counterpart (stages release a whole stage at once).

Example:
    >>> from datetime import datetime, timedelta
    >>> from taskexec.models import RunManifest, ManifestTask, TaskResult, TaskStatus
    >>> t0 = datetime(2026, 12, 8)
    >>> m = RunManifest(plan_id="p", stages=[["a"], ["b"]], tasks=[
    ...     ManifestTask(id="a", handler="stub", stage=0),
    ...     ManifestTask(id="b", handler="stub", stage=1, depends_on=["a"])])
    >>> done = [TaskResult(id="a", status=TaskStatus.SUCCEEDED, finished_at=t0),
    ...         TaskResult(id="b", status=TaskStatus.SUCCEEDED, started_at=t0 + timedelta(seconds=0.004))]
    >>> edge_latencies(m, done)
    [0.004]
"""

from __future__ import annotations

from collections.abc import Iterable

from taskexec.models import RunManifest, TaskResult

__all__ = ["edge_latencies"]


def edge_latencies(manifest: RunManifest, tasks: Iterable[TaskResult]) -> list[float]:
    """Seconds from the end of each started task's last upstream task to its start."""
    rows = {t.id: t for t in tasks}
    out: list[float] = []
    for task in manifest.tasks:
        row = rows.get(task.id)
        if row is None or row.started_at is None or not task.depends_on:
            continue
        ends = [rows[d].finished_at if d in rows else None for d in task.depends_on]
        if any(e is None for e in ends):
            continue
        last = max(e for e in ends if e is not None)
        out.append(round((row.started_at - last).total_seconds(), 6))
    return out
