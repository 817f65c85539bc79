"""Following runs to their end; on a terminal, the live view of ``taskexec run`` and ``watch``.

The view shows, per run, a progress bar per stage with counts by status, the running
tasks with their elapsed time, and the latest failures; retries and failures are also
printed above it as they happen, and a summary table ends it. Not on a terminal, nothing
is drawn: :func:`follow` waits, and hands each change to ``on_change`` as one line of
plain text (:func:`transitions`), if given: what ``taskexec watch`` prints to a pipe.

Fed by run events (Redis pub/sub, ``taskexec:run:<id>``): an event wakes the loop, which
then reads the store, so a missed event costs nothing but a later refresh. Without Redis
(an embedded run that has ended, or a Redis that is gone) it polls the store.

Example:
    >>> [result] = follow(client, [run_id], interactive=False, timeout=60)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from taskexec import report
from taskexec.errors import TaskexecError
from taskexec.models import FlowState, RunResult, RunStatus, TaskStatus
from taskexec.run.events import channel
from taskexec.store import repository as repo

if TYPE_CHECKING:
    from taskexec.client import Client

__all__ = ["changes", "follow", "render", "transitions"]

#: Active tasks listed under a run's bars; the rest are counted.
MAX_ACTIVE_SHOWN = 10
#: Latest failures listed under a run's bars.
MAX_FAILURES_SHOWN = 5
_POLL = 0.5  # seconds between store reads without an event
#: Statuses listed under the progress bars: worked on, or waiting for a retry or a person.
_IN_HAND = (TaskStatus.RUNNING, TaskStatus.VALIDATING, TaskStatus.RETRYING, TaskStatus.WAITING_APPROVAL)


def render(
    result: RunResult, now: datetime | None = None, *, flow: FlowState | None = None
) -> RenderableType:
    """One run's progress: a row per stage (bar and counts), its rate limits and concurrency
    slots, then active tasks and failures."""
    now = now or datetime.now(UTC)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(width=30)
    grid.add_column()
    stages: dict[int, list[TaskStatus]] = {}
    for t in result.tasks:
        stages.setdefault(t.stage, []).append(t.status)
    for stage, statuses in sorted(stages.items()):
        done = sum(1 for s in statuses if s.terminal)
        counts = Counter(s.value for s in statuses)
        text = Text(f"{done}/{len(statuses)}  ")
        for name in TaskStatus:
            if counts.get(name.value):
                text.append(
                    f"{counts[name.value]} {name.value}  ", style=report.STATUS_STYLE.get(name.value, "")
                )
        grid.add_row(f"stage {stage}", ProgressBar(total=len(statuses), completed=done, width=30), text)
    lines: list[RenderableType] = [Text(report.summary_line(result), style="bold"), grid]
    if flow is not None:
        for limit in flow.limits:
            lines.append(
                Text(
                    f"  rate limit {limit.name}: {limit.tokens:.1f}/{limit.burst} tokens, "
                    f"{limit.waiting} waiting ({limit.reserved:.1f} reserved; "
                    f"{limit.per_minute:g}/min, {limit.scope})",
                    style="cyan",
                )
            )
        if flow.concurrency:
            lines.append(Text(f"  concurrency: {flow.running}/{flow.concurrency} slots held", style="cyan"))
    active = [t for t in result.tasks if t.status in _IN_HAND]
    for t in active[:MAX_ACTIVE_SHOWN]:
        since = f"{(now - t.started_at).total_seconds():5.1f} s" if t.started_at else "      "
        if t.status is TaskStatus.RETRYING:
            note = f"  {t.error_message or f'attempt {t.attempts} failed'}"
        elif t.status is TaskStatus.WAITING_APPROVAL:
            ask = (t.output or {}).get("approval", {})
            note = f"  {ask.get('message', '')}  (taskexec approve {result.run_id} {t.id})"
        else:
            note = f"  attempt {t.attempts}" if t.attempts > 1 else ""
        lines.append(
            Text(
                f"  {t.status.value:<10} {since}  {t.id}{note}"[:160],
                style=report.STATUS_STYLE.get(t.status.value, ""),
            )
        )
    if len(active) > MAX_ACTIVE_SHOWN:
        lines.append(Text(f"  … and {len(active) - MAX_ACTIVE_SHOWN} more active", style="dim"))
    for t in [t for t in result.tasks if t.status.failure][-MAX_FAILURES_SHOWN:]:
        lines.append(Text(f"  ✗ {t.id}: {t.error_code or ''} {t.error_message or ''}"[:160], style="red"))
    return Group(*lines)


def changes(before: RunResult | None, after: RunResult) -> list[Text]:
    """Lines for what happened to a run's tasks between two reads: retries and failures."""
    if before is None:
        return []
    prev = {t.id: t for t in before.tasks}
    out: list[Text] = []
    for t in after.tasks:
        p = prev.get(t.id)
        if p is None:
            continue
        if t.status is TaskStatus.RETRYING and (p.status is not t.status or t.attempts > p.attempts):
            why = t.error_message or f"attempt {t.attempts} failed"
            out.append(Text(f"↻ {t.id} retrying: {why}"[:200], style="magenta"))
        elif t.attempts > max(p.attempts, 1) and TaskStatus.RETRYING not in (p.status, t.status):
            # Retried between two reads: the retry was never shown, say so now.
            out.append(Text(f"↻ {t.id} {t.status.value} on attempt {t.attempts}", style="magenta"))
        if t.status.failure and not p.status.failure:
            code = f"{t.error_code} " if t.error_code else ""
            out.append(
                Text(f"✗ {t.id} {t.status.value}: {code}{t.error_message or ''}"[:200], style="bold red")
            )
    return out


def transitions(before: RunResult | None, after: RunResult) -> list[str]:
    """Plain lines for what changed in a run between two reads, one per task that moved.

    The first read of a run that goes on is its summary line and a line per task in hand
    (running, retrying, waiting for approval); a run's end is left to the caller (``watch``
    prints the final summary line).

    Example:
        >>> transitions(before, after)  # doctest: +SKIP
        ['t1 succeeded', 't2 running', 'gate waiting_approval: Ship it? (taskexec approve RUN gate)']
    """
    if before is None and after.status.terminal:
        return []
    prev = {t.id: t for t in before.tasks} if before is not None else None
    out: list[str] = [] if before is not None else [report.summary_line(after)]
    for t in after.tasks:
        if prev is None:
            if t.status not in _IN_HAND:
                continue
        elif (p := prev.get(t.id)) is not None and (p.status, p.attempts) == (t.status, t.attempts):
            continue
        line = f"{t.id} {t.status.value}"
        if t.attempts > 1:
            line += f" (attempt {t.attempts})"
        if t.status is TaskStatus.WAITING_APPROVAL:
            ask = (t.output or {}).get("approval") or {}
            line += f": {ask.get('message', '')} (taskexec approve {after.run_id} {t.id})"
        elif t.status is TaskStatus.RETRYING or t.status.failure:
            code = f"{t.error_code} " if t.error_code and t.status.failure else ""
            line += f": {code}{t.error_message or ''}"
        out.append(line.rstrip(": ")[:300])
    return out


def follow(
    client: Client,
    run_ids: Sequence[str],
    *,
    interactive: bool,
    timeout: float | None = None,
    check: Callable[[], None] | None = None,
    console: Console | None = None,
    on_change: Callable[[str], None] | None = None,
    tables: bool = True,
) -> list[RunResult]:
    """Wait for runs to end (or ``timeout`` seconds); on a terminal, show them live.

    ``check`` is called on every refresh and may raise to stop following (an embedded
    fleet whose worker died). Not on a terminal, ``on_change`` gets a line per change as it
    is seen. On a terminal, a summary table per run ends the view unless ``tables`` is
    false. Returns the runs' results as they are at the end.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pubsub = _subscribe(client, run_ids)
    try:
        if not interactive and on_change is None:
            while not _all_ended(client, run_ids):
                if check is not None:
                    check()
                if _past(deadline):
                    break
                _wait_for_event(pubsub, _left(deadline))
            return [client.status(r) for r in run_ids]
        if not interactive:
            assert on_change is not None
            seen: dict[str, RunResult] = {}
            while True:
                if check is not None:
                    check()
                results = [client.status(r) for r in run_ids]
                for r in results:
                    for text in transitions(seen.get(r.run_id), r):
                        on_change(text)
                    seen[r.run_id] = r
                if all(r.status.terminal for r in results) or _past(deadline):
                    return results
                _wait_for_event(pubsub, _left(deadline))
        console = console or Console()
        shown: dict[str, RunResult] = {}
        with Live(console=console, refresh_per_second=4, transient=True) as view:
            while True:
                if check is not None:
                    check()
                results = [client.status(r) for r in run_ids]
                for r in results:
                    for line in changes(shown.get(r.run_id), r):
                        view.console.print(line)
                    shown[r.run_id] = r
                view.update(Group(*(render(r, flow=_flow(client, r)) for r in results)))
                if all(r.status.terminal for r in results) or _past(deadline):
                    break
                _wait_for_event(pubsub, _left(deadline))
    finally:
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()
    if tables:
        for r in results:
            report.render_table(r, console)
    return results


def _flow(client: Client, result: RunResult) -> FlowState | None:
    """A running run's rate limits and slots, when it has any (``None`` without Redis)."""
    if result.status.terminal:
        return None
    try:
        flow = client.flow(result.run_id)
    except (redis.RedisError, OSError, TaskexecError):  # no Redis (any more): the store's view
        return None
    return flow if flow.limits or flow.concurrency else None


def _all_ended(client: Client, run_ids: Sequence[str]) -> bool:
    # One status column per run: cheaper than a full result while nothing is drawn.
    with client.store.begin() as s:
        return all(RunStatus(repo.get_run(s, r).status).terminal for r in run_ids)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _left(deadline: float | None) -> float:
    return _POLL if deadline is None else max(0.0, min(_POLL, deadline - time.monotonic()))


def _events_client(client: Client) -> redis.Redis | None:
    """Redis carrying the runs' events: the fleet's, or a live embedded server under home."""
    if not client.settings.embedded:
        return client.redis
    from taskexec.embedded import live_socket

    sock = live_socket(Path(client.settings.home))
    return None if sock is None else redis.Redis(unix_socket_path=str(sock), socket_timeout=5)


def _subscribe(client: Client, run_ids: Sequence[str]) -> redis.client.PubSub | None:
    try:
        r = _events_client(client)
        if r is None:
            return None
        pubsub: redis.client.PubSub = r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(*[channel(x) for x in run_ids])
        return pubsub
    except (redis.RedisError, OSError, ValueError, TaskexecError):
        return None


def _wait_for_event(pubsub: redis.client.PubSub | None, timeout: float) -> None:
    """Return on a run event (after draining a burst of them) or after ``timeout`` seconds."""
    if pubsub is None:
        time.sleep(timeout)
        return
    try:
        end = time.monotonic() + timeout
        while pubsub.get_message(timeout=max(0.0, end - time.monotonic())) is None:
            if time.monotonic() >= end:
                return
        # A stage's tasks change state in bursts: read the store once per burst.
        burst_end = time.monotonic() + 0.05
        while time.monotonic() < burst_end and pubsub.get_message(timeout=0.01) is not None:
            pass
    except (redis.RedisError, OSError):
        time.sleep(max(0.0, timeout))
