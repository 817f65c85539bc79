"""The fleet page's data: workers (Celery inspect, a short timeout), queue lengths, each
running run's rate limits and slots, and the schedules (enable/disable as the CLI does)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from redis import RedisError

from taskexec.celery_app import QUEUES
from taskexec.errors import TaskexecError
from taskexec.metrics.collectors import priority_lists
from taskexec.models import FlowState
from taskexec.schedules import set_enabled
from taskexec.store import repository as repo
from taskexec.ui.board import Board

__all__ = ["FleetView", "fleet_view", "set_schedule"]

log = logging.getLogger(__name__)

#: Seconds a worker has to answer the inspect broadcast: a page must not hang on a dead one.
INSPECT_TIMEOUT = 1.0
#: Running runs whose rate limits and slots are read (each is a few Redis round trips).
MAX_FLOWS = 20


@dataclass
class Worker:
    """One worker as it answered the inspect broadcast."""

    name: str
    queues: list[str]
    active: int
    processes: int | None
    total: dict[str, int]


@dataclass
class FleetView:
    """What the fleet page shows."""

    workers: list[Worker] = field(default_factory=list)
    queues: dict[str, int] = field(default_factory=dict)
    flows: list[tuple[str, FlowState]] = field(default_factory=list)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def fleet_view(board: Board) -> FleetView:
    """Workers, queues, flow and schedules; what could not be read is listed in ``problems``."""
    view = FleetView(schedules=board.schedules())
    client = board.client
    if client is None:
        view.problems.append("no fleet configured: the workers and queues are not shown")
        return view
    try:
        inspect = client.app.control.inspect(timeout=INSPECT_TIMEOUT)
        queues = inspect.active_queues() or {}
        active = inspect.active() or {}
        stats = inspect.stats() or {}
        for name in sorted(set(queues) | set(active) | set(stats)):
            pool = (stats.get(name) or {}).get("pool") or {}
            view.workers.append(
                Worker(
                    name=name,
                    queues=sorted(q.get("name", "?") for q in queues.get(name) or []),
                    active=len(active.get(name) or []),
                    processes=pool.get("max-concurrency"),
                    total=dict((stats.get(name) or {}).get("total") or {}),
                )
            )
    except (RedisError, OSError) as e:
        view.problems.append(f"workers not inspected: {e}")
    try:
        options = client.app.conf.broker_transport_options or {}
        pipe = client.redis.pipeline(transaction=False)
        lists = {q: priority_lists(q, options) for q in QUEUES}
        for names in lists.values():
            for name in names:
                pipe.llen(name)
        sizes = iter(pipe.execute())
        view.queues = {q: sum(int(next(sizes)) for _ in names) for q, names in lists.items()}
    except (RedisError, OSError) as e:
        view.problems.append(f"queue lengths not read: {e}")
    with board.store.begin() as s:
        running = [r[0] for r in repo.runs_in_flight(s)][:MAX_FLOWS]
    for run_id in running:
        with contextlib.suppress(RedisError, OSError, TaskexecError):
            flow = client.flow(run_id)
            if flow.limits or flow.concurrency:
                view.flows.append((run_id, flow))
    return view


def set_schedule(board: Board, schedule_id: str, enabled: bool) -> None:
    """Enable or disable a schedule (``taskexec schedule enable|disable``)."""
    with board.store.begin() as s:
        set_enabled(s, schedule_id, enabled)
