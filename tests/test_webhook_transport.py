"""Webhook POSTs over ``httpx.MockTransport``: what is sent and how each answer is judged.

The real local server's cases (signatures, retries, the SSRF guard) are in test_notify.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from workers import netguard
from workers.notify import post


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/slow":
            raise httpx.ConnectTimeout("timed out", request=request)
        if request.url.path == "/moved":
            return httpx.Response(301, headers={"location": "http://hooks.example/ok"})
        return httpx.Response(int(request.url.path.strip("/")))

    mock = httpx.Client(transport=httpx.MockTransport(answer))
    chosen: list[bool] = []

    def client(allowance: netguard.Allowance, redirects: bool = True) -> httpx.Client:
        chosen.append(redirects)
        return mock

    monkeypatch.setattr(netguard, "client", client)
    try:
        yield seen
    finally:
        mock.close()
    assert chosen and not any(chosen), "a webhook never follows a redirect"


def test_a_webhook_posts_the_exact_body_with_its_headers_and_timeout(sent: list[httpx.Request]) -> None:
    headers = {"Content-Type": "application/json", "X-Taskexec-Delivery": "d1", "idempotency-key": "d1"}
    attempt = post("http://hooks.example/204", b'{"a":1}', headers, 4.5)
    assert (attempt.verdict, attempt.status) == ("delivered", 204)
    [req] = sent
    assert req.method == "POST" and req.content == b'{"a":1}'
    assert req.headers["content-type"] == "application/json" and req.headers["Idempotency-Key"] == "d1"
    assert req.extensions["timeout"] == {"connect": 4.5, "read": 4.5, "write": 4.5, "pool": 4.5}


def test_a_webhook_answer_is_judged_by_its_status_or_error(sent: list[httpx.Request]) -> None:
    verdicts = {p: post(f"http://hooks.example/{p}", b"{}", {}, 2).verdict for p in ("200", "500", "429")}
    assert verdicts == {"200": "delivered", "500": "retry", "429": "retry"}
    assert post("http://hooks.example/410", b"{}", {}, 2).verdict == "give_up"
    moved = post("http://hooks.example/moved", b"{}", {}, 2)
    assert (moved.verdict, moved.status) == ("give_up", 301) and len(sent) == 5, "not followed"
    slow = post("http://hooks.example/slow", b"{}", {}, 2)
    assert slow.verdict == "retry" and "ConnectTimeout" in slow.detail
