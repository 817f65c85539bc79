"""The ``http`` handler: one HTTP request; 5xx and connection errors retry, 4xx fail.

Params: ``url`` (http or https), ``method`` (default GET, or POST with ``json``),
``headers``, ``json`` (a body sent as JSON), ``timeout`` (seconds, at most the task's).
The request carries an ``Idempotency-Key`` header (run/task/attempt) unless one is given.

Output: ``{"status_code", "headers", "json"}`` when the response is JSON, else
``{"status_code", "headers", "text"}`` (the body cut at 1 MiB).

Requests reach public addresses only, unless the operator allows more
(``TASKEXEC_HTTP_ALLOW``): every connection, redirects included, is checked when it is
made (:mod:`workers.netguard`). A refused destination fails the task at once (E001) and
nothing is sent.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from taskexec.errors import DestinationNotAllowedError, RetryableError, TaskFailed
from taskexec.handlers import HandlerContext, handler, parse_params
from workers.netguard import Allowance, opener

__all__ = ["HttpParams", "http"]

MAX_BODY = 1024 * 1024


class HttpParams(BaseModel):
    """The params of ``http``; matrix params may sit beside them and are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str = Field(pattern=r"^https?://")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(None, alias="json")
    timeout: float | None = Field(None, gt=0)


def _output(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"status_code": status, "headers": headers}
    if "json" in headers.get("Content-Type", headers.get("content-type", "")):
        try:
            out["json"] = json.loads(body)
            return out
        except ValueError:
            pass
    out["text"] = body[:MAX_BODY].decode("utf-8", "replace")
    return out


@handler("http")
def http(params: dict[str, Any], inputs: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Send the request; the response as the output."""
    p = parse_params(HttpParams, params, "http")
    headers = {"User-Agent": "taskexec", "Idempotency-Key": ctx.idempotency_key, **p.headers}
    data = None
    if p.json_body is not None:
        data = json.dumps(p.json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    method = p.method or ("POST" if data is not None else "GET")
    req = urllib.request.Request(p.url, data=data, headers=headers, method=method)
    timeout = min(p.timeout or ctx.timeout, ctx.timeout)
    guarded = opener(Allowance.parse(ctx.settings.http_allow))
    try:
        with guarded.open(req, timeout=timeout) as resp:
            return _output(resp.status, dict(resp.headers), resp.read(MAX_BODY + 1))
    except DestinationNotAllowedError as e:
        raise DestinationNotAllowedError(f"{method} {p.url}: {e.message}") from None
    except urllib.error.HTTPError as e:
        body = e.read(2000).decode("utf-8", "replace").strip()
        message = f"{method} {p.url}: HTTP {e.code} {body[:300]}".strip()
        if e.code >= 500 or e.code == 429:
            raise RetryableError(message) from None
        raise TaskFailed(message) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise RetryableError(f"{method} {p.url}: {reason}") from None
