"""An attempt's logs: what its handler printed, logged and raised, bounded and masked.

A :class:`LogCapture` lives for one attempt. The handler feeds it through its context
(``ctx.emit(stream, text)``: a shell step's stdout and stderr line by line, the http
handler's status line and body excerpt), through ``ctx.logger`` (:meth:`LogCapture.handler`),
and the attempt adds the exception the handler raised (:meth:`LogCapture.raised`). Meanwhile
a thread publishes what came, every :data:`FLUSH_SECONDS`, on the run's log feed
(:mod:`taskexec.run.logfeed`) for ``taskexec logs --follow``. When the attempt ends,
:meth:`LogCapture.close` returns its streams for the store (``attempt_logs``).

Bounds: an attempt keeps at most ``TASKEXEC_MAX_LOG_BYTES`` of its streams together, shared
out so that a flood of stdout does not crowd out stderr or the traceback (each stream gets
an equal part, and what a short one leaves goes to the others); a cut stream ends with
``… [truncated: 3.2 MiB more]``. Live output stops at the same size, with a notice. Memory
stays bounded too: beyond that size a stream's bytes are counted, not kept.

Secrets: every text is masked as outputs are (:func:`workers.secrets.redact`, the encodings
included) before it is stored or published. A live piece is published only up to a point
where no secret can be cut in two: a line's end (when no secret holds a newline), and
otherwise all but the length of the longest encoded secret, which waits for what follows.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime

from redis import Redis

from taskexec.run import logfeed
from taskexec.store.repository import LogStream
from taskexec.store.tables import utcnow
from workers import secrets as secret_values

__all__ = ["FLUSH_SECONDS", "LogCapture", "human_size", "shares"]

#: Live output is published at most this often (one Redis round trip per batch, not per line).
FLUSH_SECONDS = 0.05
_NUL = "\x00"  # PostgreSQL's text refuses it
#: A cut stream ends at its last whole line when that is at most this many characters back.
_LINE_SLACK = 1024


def human_size(n: int) -> str:
    """``n`` bytes for people.

    >>> human_size(512), human_size(3 * 1024 + 300), human_size(int(3.2 * 1024 * 1024))
    ('512 bytes', '3.3 KiB', '3.2 MiB')
    """
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def shares(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """How many bytes each stream keeps of ``limit``: equal parts, a short stream's rest to the others.

    >>> shares({"stdout": 5000, "stderr": 100, "error": 300}, 1000)
    {'stderr': 100, 'error': 300, 'stdout': 600}
    """
    out: dict[str, int] = {}
    left = limit
    order = sorted(sizes, key=lambda s: sizes[s])
    for i, name in enumerate(order):
        give = min(sizes[name], left // (len(order) - i))
        out[name] = give
        left -= give
    return out


def _marked(text: str, note: str) -> str:
    """``text`` with ``note`` on a line of its own after it."""
    return text + ("" if not text or text.endswith("\n") else "\n") + note


def _cut_bytes(text: str, size: int) -> str:
    """The longest start of ``text`` of at most ``size`` UTF-8 bytes (no character cut in two)."""
    data = text.encode()
    return text if len(data) <= size else data[:size].decode("utf-8", "ignore")


@dataclass
class _Stream:
    """One stream of the attempt: what is kept of it, and what waits to be published."""

    began: datetime
    kept: list[str] = field(default_factory=list)
    kept_bytes: int = 0
    total_bytes: int = 0
    pending: str = ""


class LogCapture:
    """The logs of one attempt; thread-safe (a command's streams may come from two threads).

    Example:
        >>> capture = LogCapture("run", "task", 1, limit=1024, redis=None)
        >>> capture.secrets = ["hunter22"]
        >>> capture.emit("stdout", "password: hunter22\\n")
        >>> [(s, text, cut) for s, text, cut, _ in capture.close()]
        [('stdout', 'password: ***\\n', False)]
    """

    def __init__(self, run_id: str, task_id: str, attempt: int, *, limit: int, redis: Redis | None) -> None:
        self.run_id, self.task_id, self.attempt = run_id, task_id, attempt
        self.limit = limit
        self._redis = redis
        self._streams: dict[str, _Stream] = {}
        self._secrets: list[str] = []
        self._margin = 0  # characters a live piece keeps back (secrets being printed)
        self._by_line = True  # no secret holds a newline: a line's end is a safe cut
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._published = 0  # bytes published live
        self._seq = 0
        self._flusher: threading.Thread | None = None

    @property
    def secrets(self) -> list[str]:
        """The attempt's secret values: masked in everything kept or published."""
        return self._secrets

    @secrets.setter
    def secrets(self, found: list[str]) -> None:
        with self._lock:
            self._secrets = list(found)
            self._margin = secret_values.longest_form(self._secrets)
            self._by_line = not any("\n" in f for s in self._secrets for f in secret_values.variants(s))

    def emit(self, stream: str, text: str) -> None:
        """Add what the handler printed to ``stream`` (``stdout``, ``stderr``, ``http``...)."""
        if not text:
            return
        text = text.replace(_NUL, "\ufffd")
        size = len(text.encode())
        with self._lock:
            if self._closed:
                return
            s = self._streams.get(stream)
            if s is None:
                s = self._streams[stream] = _Stream(began=utcnow())
            s.total_bytes += size
            room = self.limit + 4 * self._margin - s.kept_bytes
            if room > 0:
                part = text if size <= room else _cut_bytes(text, room)
                s.kept.append(part)
                s.kept_bytes += min(size, room)
            if self._redis is not None and self._published < self.limit:
                s.pending += text
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_loop, name="taskexec-logs", daemon=True
                    )
                    self._flusher.start()
                self._wake.notify()

    def raised(self, exc: BaseException, *, with_traceback: bool, message: str | None = None) -> None:
        """Add the exception the handler raised: its type and message, and its traceback
        when ``with_traceback`` (a handler of the operator's; a built-in's says enough)."""
        if with_traceback:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        else:
            said = message if message is not None else getattr(exc, "message", None) or str(exc)
            text = f"{type(exc).__name__}: {said}\n"
        self.emit("error", text)

    def handler(self) -> logging.Handler:
        """A logging handler that adds each record to the ``log`` stream."""
        return _LogLines(self)

    def close(self) -> list[LogStream]:
        """Stop: publish what waits, and return the streams to store (bounded, masked)."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            flusher = self._flusher
        if flusher is not None:
            flusher.join(10)
        with self._lock:
            chunks = self._take(final=True)
            stored = self._stored()
        logfeed.publish(self._redis, chunks)
        return stored

    # ------------------------------------------------------------------ stored

    def _stored(self) -> list[LogStream]:
        masked: dict[str, str] = {}
        for name, s in self._streams.items():
            raw = "".join(s.kept)
            if s.total_bytes > s.kept_bytes and self._margin:
                # Cut while kept: a secret may have been cut in two at the end; drop that part.
                raw = raw[: secret_values.safe_cut(raw, max(0, len(raw) - self._margin), self._secrets)]
            masked[name] = secret_values.redact(raw, self._secrets)
        keep = shares({n: len(t.encode()) for n, t in masked.items()}, self.limit)
        out: list[LogStream] = []
        for name, s in sorted(self._streams.items(), key=lambda kv: kv[1].began):
            text = _cut_bytes(masked[name], keep[name])
            cut = len(text.encode()) < len(masked[name].encode()) or s.total_bytes > s.kept_bytes
            if cut:
                line_end = text.rfind("\n") + 1  # cut after a whole line, when one ends near
                if line_end and len(text) - line_end <= _LINE_SLACK:
                    text = text[:line_end]
                more = max(1, s.total_bytes - len(text.encode()))
                text = _marked(text, f"… [truncated: {human_size(more)} more]")
            out.append((name, text, cut, s.began))
        return out

    # ------------------------------------------------------------------ live

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not any(s.pending for s in self._streams.values()):
                    self._wake.wait()
                if self._closed:
                    return
                chunks = self._take(final=False)
            # Outside the lock: the handler goes on printing during the round trip.
            logfeed.publish(self._redis, chunks)
            time.sleep(FLUSH_SECONDS)  # what comes meanwhile goes in the next batch

    def _take(self, *, final: bool) -> list[logfeed.Chunk]:
        """The chunks that may be published now, numbered (under the lock)."""
        chunks: list[logfeed.Chunk] = []
        now = time.time()
        for name, s in sorted(self._streams.items(), key=lambda kv: kv[1].began):
            if not s.pending:
                continue
            cut = len(s.pending) if final else self._safe_end(s.pending)
            if cut <= 0:
                continue
            text = secret_values.redact(s.pending[:cut], self._secrets)
            s.pending = s.pending[cut:]
            size = len(text.encode())
            truncated = False
            if self._published + size > self.limit:
                text = _cut_bytes(text, self.limit - self._published)
                note = f"… [truncated: live output stops at {human_size(self.limit)}; see the stored log]\n"
                text = _marked(text, note)
                truncated = True
            self._published += size
            chunks.append(self._chunk(name, text, now, truncated))
            if truncated:
                for other in self._streams.values():
                    other.pending = ""
                break
        return chunks

    def _safe_end(self, pending: str) -> int:
        """How much of a stream's pending text may be published before more of it comes."""
        if not self._margin:
            return len(pending)
        end = pending.rfind("\n") + 1 if self._by_line else 0
        if len(pending) - end > self._margin:  # a long line, or secrets with newlines
            end = secret_values.safe_cut(pending, len(pending) - self._margin, self._secrets)
        return end

    def _chunk(self, stream: str, text: str, at: float, truncated: bool) -> logfeed.Chunk:
        chunk: logfeed.Chunk = {
            "run_id": self.run_id,
            "task_id": self.task_id,
            "attempt": self.attempt,
            "stream": stream,
            "text": text,
            "seq": self._seq,
            "at": at,
            "truncated": truncated,
        }
        self._seq += 1
        return chunk


class _LogLines(logging.Handler):
    """Adds what a handler logs through ``ctx.logger`` to its attempt's ``log`` stream."""

    def __init__(self, capture: LogCapture) -> None:
        super().__init__()
        self.capture = capture
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.capture.emit("log", self.format(record) + "\n")
        except Exception:  # a log line must never fail the handler that wrote it
            self.handleError(record)
