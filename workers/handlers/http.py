"""The ``http`` handler: one HTTP request; 5xx and connection errors retry, 4xx fail.

Params: ``url`` (http or https), ``method`` (default GET, or POST with ``json``),
``headers``, ``json`` (a body sent as JSON), ``timeout`` (seconds, at most the task's).
The request carries an ``Idempotency-Key`` header (run/task/attempt) unless one is given.

Output: ``{"status_code", "headers", "json"}`` when the response is JSON (its
``Content-Type``, a header name matched in any case, says ``json``), else
``{"status_code", "headers", "text"}`` (the body cut at 1 MiB). ``headers`` keeps the
names as the server sent them.

The attempt's log (``ctx.emit``, stream ``http``) gets the request line, the response's
status line and the first 4 KiB of its body, for failures too (a 500 and what it said).

Requests go through this worker process's pooled httpx client
(:func:`workers.netguard.client`): connections are kept alive between tasks; the request's
timeout (connect, each read and write) is ``timeout``.

Requests reach public addresses only, unless the operator allows more
(``TASKEXEC_HTTP_ALLOW``): every connection, redirects included, is checked when it is
made (:mod:`workers.netguard`). A refused destination fails the task at once (E001) and
nothing is sent.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from taskexec.errors import DestinationNotAllowedError, RetryableError, TaskFailed
from taskexec.handlers import HandlerContext, HttpParams, handler, parse_params
from workers import netguard

__all__ = ["HttpParams", "http"]

MAX_BODY = 1024 * 1024
#: The start of a response's body kept in the attempt's log (with its status line).
LOG_EXCERPT = 4096


def _headers(response: httpx.Response) -> dict[str, str]:
    """The response's headers as the server named them; a repeated one joined by commas."""
    out: dict[str, str] = {}
    lower: dict[str, str] = {}
    for raw_name, raw_value in response.headers.raw:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        first = lower.setdefault(name.lower(), name)
        out[first] = f"{out[first]}, {value}" if first in out else value
    return out


def _output(response: httpx.Response, body: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"status_code": response.status_code, "headers": _headers(response)}
    if "json" in response.headers.get("content-type", "").lower():  # httpx: any case of the name
        try:
            out["json"] = json.loads(body)
            return out
        except ValueError:
            pass
    out["text"] = body[:MAX_BODY].decode("utf-8", "replace")
    return out


def _exchange_log(method: str, url: str, response: httpx.Response, body: bytes) -> str:
    """The request line, the status line and the start of the body: the attempt's log."""
    excerpt = body[:LOG_EXCERPT].decode("utf-8", "replace")
    more = "\n… [body cut for the log]" if len(body) > LOG_EXCERPT else ""
    status = f"{response.http_version} {response.status_code} {response.reason_phrase}".rstrip()
    return f"{method} {url}\n{status}\n\n{excerpt}{more}\n"


def _read(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the body (a larger one is not read to its end)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


@handler("http", params=HttpParams)
def http(params: dict[str, Any], inputs: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Send the request; the response as the output."""
    p = parse_params(HttpParams, params, "http")
    headers = httpx.Headers({"User-Agent": "taskexec", "Idempotency-Key": ctx.idempotency_key})
    headers.update(p.headers)  # the plan's, whatever the case of their names, win
    content = None
    if p.json_body is not None:
        content = json.dumps(p.json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    method = p.method or ("POST" if content is not None else "GET")
    timeout = min(p.timeout or ctx.timeout, ctx.timeout)
    session = netguard.client(netguard.Allowance.parse(ctx.settings.http_allow))
    try:
        with session.stream(method, p.url, content=content, headers=headers, timeout=timeout) as resp:
            if resp.is_success:
                data = _read(resp, MAX_BODY + 1)
                ctx.emit("http", _exchange_log(method, p.url, resp, data))
                return _output(resp, data)
            data = _read(resp, LOG_EXCERPT + 1)  # one more: whether the excerpt is all of it
            ctx.emit("http", _exchange_log(method, p.url, resp, data))
            body = data[:2000].decode("utf-8", "replace").strip()
    except DestinationNotAllowedError as e:
        raise DestinationNotAllowedError(f"{method} {p.url}: {e.message}") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.TooManyRedirects) as e:
        raise TaskFailed(f"{method} {p.url}: {e}") from None
    except httpx.TransportError as e:  # refused, DNS, TLS, timeouts, a reset
        raise RetryableError(f"{method} {p.url}: {type(e).__name__}: {e}") from None
    message = f"{method} {p.url}: HTTP {resp.status_code} {body[:300]}".strip()
    if resp.status_code >= 500 or resp.status_code == 429:
        raise RetryableError(message)
    raise TaskFailed(message)
