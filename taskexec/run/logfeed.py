"""Live log chunks of running attempts, on Redis: what ``taskexec logs --follow`` reads.

A worker publishes what an attempt prints as it comes (secrets already masked) on the
run's log channel, ``taskexec:logs:<run id>``, beside the run's state events
(``taskexec:run:<id>``, :mod:`taskexec.run.events`). Not on that channel itself: every
subscriber of it (``watch``, the live view, the metrics exporter) would wake, and count,
for each line a command prints. Each chunk is also appended to a backlog list of its
attempt, kept :data:`BACKLOG_SECONDS`, so that a follower who joins while the attempt
runs sees its beginning; chunks are numbered (``seq``) per attempt, so that a follower
drops what it got twice.

The record of an attempt's logs is the store (``attempt_logs``), written when it ends;
this feed is a live view and may lose chunks (Redis restarted): publishing never fails
the caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict

from redis import Redis, RedisError

from taskexec.models import AttemptLog

__all__ = ["BACKLOG_SECONDS", "Chunk", "backlog", "backlog_key", "channel", "publish", "to_record"]

log = logging.getLogger(__name__)

#: How long the backlog of an attempt's chunks stays in Redis after its last chunk.
BACKLOG_SECONDS = 3600


class Chunk(TypedDict):
    """One published piece of an attempt's output."""

    run_id: str
    task_id: str
    attempt: int
    stream: str
    text: str
    #: Its number among the attempt's chunks, from 0.
    seq: int
    #: When it was published (seconds since the epoch).
    at: float
    #: True for the notice that live output stops (TASKEXEC_MAX_LOG_BYTES reached).
    truncated: bool


def channel(run_id: str) -> str:
    """The pub/sub channel of a run's log chunks."""
    return f"taskexec:logs:{run_id}"


def backlog_key(run_id: str, task_id: str, attempt: int) -> str:
    """The list holding an attempt's chunks in order."""
    return f"taskexec:logs:{run_id}:{attempt}:{task_id}"


def publish(redis: Redis | None, chunks: Sequence[Chunk]) -> None:
    """Append chunks to their attempts' backlogs and publish them; errors are logged, not raised."""
    if redis is None or not chunks:
        return
    try:
        pipe = redis.pipeline(transaction=False)
        for c in chunks:
            data = json.dumps(c)
            key = backlog_key(c["run_id"], c["task_id"], c["attempt"])
            # Listed before it is published: a follower that receives it finds it listed.
            pipe.rpush(key, data)
            pipe.expire(key, BACKLOG_SECONDS)
            pipe.publish(channel(c["run_id"]), data)
        pipe.execute()
    except RedisError as e:
        log.warning("log chunks not published: %s", e)


def backlog(redis: Redis, run_id: str, task_id: str, attempt: int) -> list[Chunk]:
    """The chunks an attempt has published so far, in order (empty once expired)."""
    raw: list[Any] = redis.lrange(backlog_key(run_id, task_id, attempt), 0, -1)
    return [json.loads(x) for x in raw]


def to_record(chunk: Chunk) -> AttemptLog:
    """A chunk as the record ``taskexec logs`` prints (``at`` as a UTC time)."""
    return AttemptLog(
        run_id=chunk["run_id"],
        task_id=chunk["task_id"],
        attempt=chunk["attempt"],
        stream=chunk["stream"],
        text=chunk["text"],
        truncated=bool(chunk.get("truncated")),
        at=datetime.fromtimestamp(chunk["at"], UTC),
    )
