"""Attempts' logs for people: following them while tasks run, and printing them.

:func:`follow` yields a run's (a task's, an attempt's) stored logs, then what running
attempts print as it comes, until the task (without one, the run) ends. What it yields
comes from two places: the store, which holds an attempt's logs once it has ended, and the
live feed on Redis (:mod:`taskexec.run.logfeed`), where a running attempt's output appears
as it is printed, with a backlog from its start. An attempt is yielded from one of them,
never both: the feed's for an attempt seen running, the store's for the others (those
that ended before, or while the feed was out of reach). Without Redis (an embedded run
that has ended), the store is polled.

:class:`TextView` turns the records into text: a header line per task, attempt and
stream, then the text as it was printed.

Example:
    >>> for entry in follow(client, run_id, "build"):  # doctest: +SKIP
    ...     print(entry.stream, entry.text, end="")
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis

from taskexec.models import AttemptLog, RunStatus, TaskStatus
from taskexec.run import events, logfeed
from taskexec.store import repository as repo

if TYPE_CHECKING:
    from taskexec.client import Client

__all__ = ["TextView", "follow"]

#: Seconds between two looks at the store while no event comes.
POLL_SECONDS = 0.5

_Key = tuple[str, int]  # (task, attempt)


def _events_redis(client: Client) -> redis.Redis | None:
    """The fleet's Redis (an embedded fleet's, when the client is attached to one), or None."""
    if client.settings.embedded:
        return None
    try:
        r = client.redis
        r.ping()
        return r
    except (redis.RedisError, OSError):
        return None


class _Follower:
    """The state of one :func:`follow`: what was yielded, of which attempt, from where."""

    def __init__(self, client: Client, run_id: str, task_id: str | None, attempt: int | None) -> None:
        self.client, self.run_id, self.task_id, self.attempt = client, run_id, task_id, attempt
        self.redis = _events_redis(client)
        self.stored: set[_Key] = set()  # yielded from the store
        self.live: dict[_Key, int] = {}  # yielded from the feed: the next chunk expected

    def wanted(self, key: _Key) -> bool:
        return (self.task_id is None or key[0] == self.task_id) and (
            self.attempt is None or key[1] == self.attempt
        )

    def from_store(self) -> Iterator[AttemptLog]:
        """The stored logs of attempts not yielded yet (nor being yielded from the feed)."""
        with self.client.store.begin() as s:
            keys = [
                k
                for k in repo.logged_attempts(s, self.run_id, self.task_id, self.attempt)
                if k not in self.stored and k not in self.live
            ]
            found = [repo.attempt_logs(s, self.run_id, task, n) for task, n in keys]
        for key, entries in zip(keys, found, strict=True):
            self.stored.add(key)
            yield from entries

    def running(self) -> list[_Key]:
        """The attempts under way now that this follow wants."""
        with self.client.store.begin() as s:
            if self.task_id is not None:
                tasks = [self.task_id]
            else:
                statuses = repo.task_statuses(s, self.run_id)
                tasks = [t for t, st in statuses.items() if st is TaskStatus.RUNNING]
            out = []
            for task in tasks:
                state = repo.task_state(s, self.run_id, task)
                if state.status is TaskStatus.RUNNING and self.wanted((task, state.attempts)):
                    out.append((task, state.attempts))
        return out

    def catch_up(self, key: _Key) -> Iterator[AttemptLog]:
        """What the feed's backlog holds of an attempt past what was yielded of it."""
        if self.redis is None or key in self.stored:
            return
        try:
            chunks = logfeed.backlog(self.redis, self.run_id, key[0], key[1])
        except (redis.RedisError, OSError):
            return
        for chunk in chunks:
            yield from self.chunk(chunk, backlog=True)

    def chunk(self, chunk: logfeed.Chunk, *, backlog: bool = False) -> Iterator[AttemptLog]:
        key = (chunk["task_id"], chunk["attempt"])
        if not self.wanted(key) or key in self.stored:
            return
        expected = self.live.get(key, 0)
        if chunk["seq"] < expected:
            return  # had it already (from the backlog, or the channel)
        if chunk["seq"] > expected and not backlog:
            yield from self.catch_up(key)  # joined late, or missed some: the backlog has them
            if chunk["seq"] < self.live.get(key, 0):
                return
        self.live[key] = chunk["seq"] + 1
        yield logfeed.to_record(chunk)

    def over(self) -> bool:
        """Whether the task (the attempt; without a task, the run) has ended."""
        with self.client.store.begin() as s:
            if self.task_id is None:
                return RunStatus(repo.get_run(s, self.run_id).status).terminal
            state = repo.task_state(s, self.run_id, self.task_id)
        if state.status.terminal or self.attempt is None:
            return state.status.terminal
        # Attempt N is over once a later one began, or the task left ``running`` after it.
        return state.attempts > self.attempt or (
            state.attempts == self.attempt and state.status is not TaskStatus.RUNNING
        )


def follow(
    client: Client,
    run_id: str,
    task_id: str | None = None,
    attempt: int | None = None,
    *,
    timeout: float | None = None,
) -> Iterator[AttemptLog]:
    """A run's logs (of a task, of an attempt): those stored, then the output of running
    attempts as it comes, until the task (the attempt; without a task, the run) has ended
    or ``timeout`` seconds have passed.

    Raises:
        RunNotFoundError: No such run, or no task ``task_id`` in it (E001).
    """
    with client.store.begin() as s:
        run_id = repo.resolve_run_id(s, run_id)
        if task_id is not None:
            repo.task_state(s, run_id, task_id)
    f = _Follower(client, run_id, task_id, attempt)
    deadline = None if timeout is None else time.monotonic() + timeout
    pubsub = None
    if f.redis is not None:
        with contextlib.suppress(redis.RedisError, OSError):
            pubsub = f.redis.pubsub(ignore_subscribe_messages=True)
            # Subscribed before anything is read: nothing printed from now on is missed.
            pubsub.subscribe(logfeed.channel(run_id), events.channel(run_id))
    try:
        over = f.over()
        yield from f.from_store()
        if over:
            return
        for key in f.running():
            yield from f.catch_up(key)
        look_at = time.monotonic() + POLL_SECONDS
        while True:
            message = _next_message(pubsub, max(0.0, look_at - time.monotonic()))
            changed = message is not None and message["channel"] != logfeed.channel(run_id)
            if message is not None and not changed:
                yield from f.chunk(message["data"])
            if not changed and time.monotonic() < look_at:
                continue
            # A state change, or time to look: a task's end, or attempts the feed did not show.
            look_at = time.monotonic() + POLL_SECONDS
            over = f.over()
            for key in list(f.live):
                if over:
                    yield from f.catch_up(key)  # the last chunks, published before the end
            yield from f.from_store()
            if over or (deadline is not None and time.monotonic() >= deadline):
                return
    finally:
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()


def _next_message(pubsub: Any, timeout: float) -> dict[str, Any] | None:
    """The next message (``channel`` as text, a log chunk's ``data`` parsed), or None."""
    if pubsub is None:
        time.sleep(timeout)
        return None
    try:
        message = pubsub.get_message(timeout=timeout)
    except (redis.RedisError, OSError):
        time.sleep(timeout)
        return None
    if message is None or message.get("type") != "message":
        return None
    name = message["channel"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    data = json.loads(message["data"])
    return {"channel": name, "data": data}


class TextView:
    """Records as text: ``==> TASK · attempt N · STREAM · TIME <==``, then the text as printed.

    Example:
        >>> from datetime import datetime, UTC
        >>> view = TextView()
        >>> entry = AttemptLog(run_id="r", task_id="build", attempt=1, stream="stdout",
        ...                    text="hello\\n", at=datetime(2026, 12, 8, 0, 1, 2, tzinfo=UTC))
        >>> print(view.text(entry) + view.end(), end="")
        ==> build · attempt 1 · stdout · 2026-12-08 00:01:02 UTC <==
        hello
    """

    def __init__(self) -> None:
        self._last: tuple[str, int, str] | None = None
        self._at_line_start = True

    def text(self, entry: AttemptLog) -> str:
        """What to print for ``entry``: a header when its task, attempt or stream is another."""
        out = ""
        key = (entry.task_id, entry.attempt, entry.stream)
        if key != self._last:
            if not self._at_line_start:
                out += "\n"
            at = f"{entry.at:%Y-%m-%d %H:%M:%S} UTC"
            out += f"==> {entry.task_id} · attempt {entry.attempt} · {entry.stream} · {at} <==\n"
            self._last = key
        out += entry.text
        if entry.text:
            self._at_line_start = entry.text.endswith("\n")
        elif out:
            self._at_line_start = True
        return out

    def end(self) -> str:
        """What ends the output: a newline if the last text had none."""
        return "" if self._at_line_start else "\n"
