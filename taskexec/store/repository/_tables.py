"""What the store's modules share: the tables as Core objects, and chunked IN lists."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

from sqlalchemy import Table

from taskexec.store.tables import Execution, ExecutionLog, ExecutionMetric, Run

# The hot path (claims, status changes, metrics: a few statements per task) runs Core
# statements on the tables: the ORM's bulk-DML layer costs more than the statements do.
EXECUTIONS = cast(Table, Execution.__table__)
LOGS = cast(Table, ExecutionLog.__table__)
METRICS = cast(Table, ExecutionMetric.__table__)
RUNS = cast(Table, Run.__table__)


def chunks(items: Sequence[str], size: int = 500) -> Iterable[Sequence[str]]:
    """``items`` in slices small enough for one ``IN (...)`` list."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
