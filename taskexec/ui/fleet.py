"""The fleet page's data: workers (Celery inspect, a short timeout), queue lengths, each
running run's rate limits and slots, and the schedules (enable/disable as the CLI does)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from redis import RedisError

from taskexec.celery_app import QUEUES
from taskexec.errors import ServiceUnavailableError, TaskexecError
from taskexec.metrics.collectors import priority_lists
from taskexec.models import FlowState
from taskexec.schedules import ScheduleInfo, cron, list_schedules, set_enabled
from taskexec.store import repository as repo
from taskexec.store.tables import utcnow
from taskexec.ui.board import Board

__all__ = ["FleetView", "fleet_view", "next_firing", "set_schedule"]

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
    schedules: list[tuple[ScheduleInfo, datetime | None]] = field(default_factory=list)  # and next firing
    problems: list[str] = field(default_factory=list)


def fleet_view(board: Board) -> FleetView:
    """Workers, queues, flow and schedules; what could not be read is listed in ``problems``."""
    with board.store.begin() as s:
        view = FleetView(schedules=[(info, next_firing(info)) for info in list_schedules(s)])
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
    except Exception as e:  # a broadcast fails in transport-specific ways: say so, show the rest
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
    except (RedisError, OSError, ServiceUnavailableError) as e:
        view.problems.append(f"queue lengths not read: {e}")
    with board.store.begin() as s:
        running = [r[0] for r in repo.runs_in_flight(s)][:MAX_FLOWS]
    for run_id in running:
        with contextlib.suppress(RedisError, OSError, TaskexecError):
            flow = client.flow(run_id)
            if flow.limits or flow.concurrency:
                view.flows.append((run_id, flow))
    return view


def next_firing(info: ScheduleInfo) -> datetime | None:
    """When a schedule fires next, as beat reckons it from its last firing (``None``:
    disabled, or not computable).

    >>> from datetime import UTC
    >>> at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    >>> info = ScheduleInfo(id="s", plan_id="p", variants=[], cron=None, every_seconds=600,
    ...     overlap="skip", tenant=None, labels={}, enabled=True, created_at=at, last_run_at=at,
    ...     last_fired_at=None, last_run_ids=[], last_outcome=None, fired=1, skipped=0)
    >>> next_firing(info).isoformat()
    '2026-01-01T12:10:00+00:00'
    """
    if not info.enabled:
        return None
    last = info.last_run_at or info.created_at
    if info.every_seconds is not None:
        return last + timedelta(seconds=info.every_seconds)
    if info.cron is None:
        return None
    try:
        remaining: timedelta = cron(info.cron).remaining_estimate(last)
    except (ValueError, TypeError, OverflowError):
        return None
    return utcnow() + remaining


def set_schedule(board: Board, schedule_id: str, enabled: bool) -> None:
    """Enable or disable a schedule (``taskexec schedule enable|disable``)."""
    with board.store.begin() as s:
        set_enabled(s, schedule_id, enabled)
