"""Webhooks of run events: ``taskexec.notify`` fans a notice out, ``taskexec.webhook`` POSTs one.

A plan's ``notify: [{url, events}]`` asks for a JSON POST when a run finishes
(``run_finished``) or one of its tasks fails for good (``task_failed``). The run never
waits for them: :func:`taskexec.run.messages.send_notice` only queues ``taskexec.notify`` on
the control queue, which builds the event once and sends one ``taskexec.webhook`` per
URL. Each URL is then retried on its own, so a failing receiver never gets the others a
second copy. Unlike the run's messages, a webhook message carries its body: the event is
taken once, so every retry sends the same bytes (a ``task_failed`` event of a run that
goes on would otherwise change from one attempt to the next).

Every POST carries:

* ``X-Taskexec-Signature: sha256=<hex>``: HMAC-SHA256 of the exact body bytes keyed with
  ``TASKEXEC_WEBHOOK_SECRET`` (absent when no secret is set);
* ``X-Taskexec-Delivery`` and ``Idempotency-Key``: one id per (run, event, task, URL),
  the same on every retry, so a receiver can drop duplicates;
* ``X-Taskexec-Event`` and ``X-Taskexec-Timestamp`` (Unix seconds of this attempt).

2xx is delivered; 5xx, 429, timeouts and connection errors are retried with exponential
backoff up to ``webhook_attempts`` POSTs; any other status (4xx, a redirect) gives up at
once. A URL whose address the operator does not allow (loopback, private, link-local,
metadata: :mod:`workers.netguard`, ``TASKEXEC_HTTP_ALLOW``) gives up at once, nothing sent.
Every attempt's outcome is a row of ``execution_logs`` (event ``notify``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import redis
from celery import Task
from redis import Redis, RedisError
from sqlalchemy.exc import SQLAlchemyError

from taskexec.celery_app import CONTROL, app
from taskexec.errors import (
    DatabaseUnavailableError,
    DestinationNotAllowedError,
    RunNotFoundError,
    TaskexecError,
)
from taskexec.models import Notify
from taskexec.store import Store, results
from taskexec.store import repository as repo
from taskexec.store.tables import utcnow
from workers import netguard
from workers.netguard import Allowance
from workers.tasks import runtime

__all__ = ["Attempt", "build_notices", "backoff", "notify", "post", "sign", "webhook"]

log = logging.getLogger("taskexec.notify")

#: Cap of one backoff delay, seconds.
MAX_BACKOFF = 600.0
#: How long a notice's delivery ids are remembered, so a redelivered notice sends nothing twice.
SENT_TTL = 7 * 24 * 3600


def sign(body: bytes, secret: str) -> str:
    """The signature header value of ``body``: ``sha256=`` and the HMAC-SHA256 hex digest.

    >>> sign(b"{}", "s")[:15]
    'sha256=143ca8d5'
    """
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_id(run_id: str, event: str, task_id: str | None, url: str) -> str:
    """The id of one notice to one URL: stable across retries and redeliveries."""
    return hashlib.sha256(f"{run_id}\n{event}\n{task_id or ''}\n{url}".encode()).hexdigest()[:32]


def where(url: str) -> str:
    """A URL as logs show it: no credentials, no query (either may hold a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(frozen=True)
class Notice:
    """One POST to make: a URL and the exact body bytes (as text) every attempt sends."""

    url: str
    body: str
    delivery_id: str


def build_notices(store: Store, run_id: str, event: str, task_id: str | None) -> list[Notice]:
    """The notices of an event: one per webhook of the run that asked for ``event``.

    Raises:
        RunNotFoundError: The run (or task) is not in the store.
    """
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        hooks = [Notify.model_validate(n) for n in (run.manifest.get("notify") or [])]
        hooks = [h for h in hooks if event in h.events]
        if not hooks:
            return []
        result = results.run_result(s, run_id)
        task = results.task_result(s, run_id, task_id) if task_id else None
    occurred: datetime = (task.finished_at if task else result.finished_at) or utcnow()
    payload: dict[str, Any] = {
        "event": event,
        "occurred_at": occurred.isoformat(),
        "run_id": run_id,
        "plan_id": result.plan_id,
        "variant": result.variant,
        "status": result.status.value,
        "statistics": result.statistics.model_dump(mode="json"),
        "tenant": result.tenant,
        "labels": result.labels,
    }
    if task is not None:
        payload["task"] = {
            "id": task.id,
            "status": task.status.value,
            "attempts": task.attempts,
            "error_code": task.error_code.value if task.error_code else None,
            "error_message": task.error_message,
        }
    out = []
    for h in hooks:
        did = delivery_id(run_id, event, task_id, h.url)
        body = json.dumps({**payload, "delivery_id": did}, sort_keys=True, separators=(",", ":"))
        out.append(Notice(h.url, body, did))
    return out


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST: ``delivered``, ``retry`` (5xx, 429, network) or ``give_up``."""

    verdict: Literal["delivered", "retry", "give_up"]
    detail: str
    status: int | None = None


def post(
    url: str, body: bytes, headers: dict[str, str], timeout: float, allowance: Allowance | None = None
) -> Attempt:
    """POST ``body`` to ``url`` once and judge the outcome.

    ``allowance``: the destinations the operator allows beyond public addresses
    (``TASKEXEC_HTTP_ALLOW``); default none. The POST goes through this worker process's
    pooled httpx client (:func:`workers.netguard.client`); ``timeout`` bounds the connect
    and each read and write.
    """
    # No redirects: a 301/302 of a POST is followed as a GET without the body; a webhook
    # that moved is misconfigured, and its receiver should say so with the status.
    session = netguard.client(allowance or Allowance(), redirects=False)
    try:
        response = session.post(url, content=body, headers=headers, timeout=timeout)
        response.close()
        code = response.status_code
    except DestinationNotAllowedError as e:
        return Attempt("give_up", e.message)
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
        return Attempt("give_up", f"{type(e).__name__}: {e}")
    except httpx.TransportError as e:  # refused, DNS, TLS, timeout, reset
        return Attempt("retry", f"{type(e).__name__}: {e}")
    if 200 <= code < 300:
        return Attempt("delivered", f"HTTP {code}", code)
    if code >= 500 or code == 429:
        return Attempt("retry", f"HTTP {code}", code)
    return Attempt("give_up", f"HTTP {code}", code)


def backoff(attempt: int, base: float, rng: random.Random | None = None) -> float:
    """Seconds before the POST after failed ``attempt`` (1-based): doubling, jittered down to half.

    >>> 2.0 <= backoff(2, 2.0) <= 4.0
    True
    """
    delay = min(MAX_BACKOFF, base * 2.0 ** (attempt - 1))
    return delay * (rng or random).uniform(0.5, 1.0)


def _record(store: Store, run_id: str, task_id: str | None, message: str) -> None:
    """A delivery outcome in ``execution_logs``; a store outage loses the line, not the POST.

    The row's ``attempt`` stays 0: that column counts the task's attempts, not the POSTs'.
    """
    try:
        with store.begin() as s:
            repo.log_line(s, run_id, task_id, 0, message, event="notify")
    except (TaskexecError, SQLAlchemyError) as e:
        log.warning("webhook log line of run %s not stored: %s", run_id, e)


def _sent(redis: Redis | None, key: str) -> bool:
    # Without Redis, send: a receiver drops a duplicate by its delivery id.
    with contextlib.suppress(RedisError):
        return bool(redis is not None and redis.exists(key))
    return False


@app.task(name="taskexec.notify", bind=True, acks_late=True, ignore_result=True, max_retries=12)
def notify(self: Task, run_id: str, event: str, task_id: str | None = None) -> None:
    """Send one ``taskexec.webhook`` per URL of the run that listens to ``event``."""
    rt = runtime()
    try:
        notices = build_notices(rt.store, run_id, event, task_id)
    except RunNotFoundError as e:
        log.warning("notice %s of run %s dropped: %s", event, run_id, e)
        return
    except DatabaseUnavailableError as e:
        raise self.retry(countdown=5.0, exc=e) from e
    for n in notices:
        key = f"taskexec:webhook:{n.delivery_id}"
        if _sent(rt.redis, key):
            continue  # a redelivery of this notice: its webhooks are on their way
        webhook.apply_async(
            args=(run_id, n.url, n.body, n.delivery_id, event, task_id),
            queue=CONTROL,
            argsrepr=f"run={run_id} event={event} url={where(n.url)}",
        )
        if rt.redis is not None:
            with contextlib.suppress(redis.RedisError):
                rt.redis.set(key, "1", ex=SENT_TTL)


@app.task(name="taskexec.webhook", bind=True, acks_late=True, ignore_result=True, max_retries=None)
def webhook(
    self: Task, run_id: str, url: str, body: str, delivery: str, event: str, task_id: str | None = None
) -> None:
    """POST one notice to one URL; retried with backoff through Celery; never raises into a run."""
    rt = runtime()
    settings = rt.settings
    attempt = int(self.request.retries) + 1
    data = body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "taskexec-webhook",
        "X-Taskexec-Event": event,
        "X-Taskexec-Delivery": delivery,
        "Idempotency-Key": delivery,
        "X-Taskexec-Timestamp": str(int(time.time())),
    }
    if settings.webhook_secret is not None:
        headers["X-Taskexec-Signature"] = sign(data, settings.webhook_secret.get_secret_value())
    result = post(url, data, headers, settings.webhook_timeout, Allowance.parse(settings.http_allow))
    what = f"webhook {event} to {where(url)}"
    if result.verdict == "retry" and attempt < settings.webhook_attempts:
        delay = backoff(attempt, settings.webhook_backoff)
        _record(
            rt.store, run_id, task_id, f"{what}: attempt {attempt}: {result.detail}; retry in {delay:.1f} s"
        )
        # A retry is a new message: keep the view without the body and the URL's query.
        raise self.retry(countdown=delay, max_retries=None, argsrepr=self.request.argsrepr)
    if result.verdict == "delivered":
        _record(rt.store, run_id, task_id, f"{what}: delivered ({result.detail}) at attempt {attempt}")
        return
    why = "retries exhausted" if result.verdict == "retry" else "not retried"
    message = f"{what}: gave up after {attempt} attempt(s), {why}: {result.detail}"
    _record(rt.store, run_id, task_id, message)
    log.warning("%s of run %s: gave up after %d attempt(s): %s", what, run_id, attempt, result.detail)
