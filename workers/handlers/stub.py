"""The ``stub`` handler: a configurable fake task for tests, demos and load.

Params (all optional; any other param, such as a matrix case's, is ignored):

* ``delay``: seconds to work (cancellation is checked while waiting);
* ``output``: the object to return (default: ``{"task_id", "attempt"}``);
* ``behavior``: ``success`` | ``failure`` (retryable) | ``timeout`` (sleeps past its
  time limit) | ``error`` (an unexpected exception);
* ``fail_attempts``: fail the first N attempts, then behave as ``behavior``;
* ``failure_rate`` and ``seed``: fail an attempt with this probability, reproducibly.

Example plan task: ``{id: flaky, handler: stub, params: {fail_attempts: 2, output: {ok: true}}}``.
"""

from __future__ import annotations

import random
import time
from typing import Any

from taskexec.errors import RetryableError, TaskCancelled
from taskexec.handlers import HandlerContext, StubParams, handler, parse_params

__all__ = ["StubParams", "stub"]


def _wait(seconds: float, ctx: HandlerContext) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if ctx.is_cancelled():
            raise TaskCancelled("the run was cancelled")
        time.sleep(min(left, 0.1))


@handler("stub", params=StubParams)
def stub(params: dict[str, Any], inputs: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Wait ``delay`` seconds, then succeed or fail as ``behavior`` says."""
    p = parse_params(StubParams, params, "stub")
    _wait(p.delay, ctx)
    if ctx.attempt <= p.fail_attempts:
        raise RetryableError(f"stub: attempt {ctx.attempt} fails (fail_attempts={p.fail_attempts})")
    if p.failure_rate and random.Random(f"{p.seed}:{ctx.task_id}:{ctx.attempt}").random() < p.failure_rate:
        raise RetryableError(f"stub: attempt {ctx.attempt} failed at random (failure_rate={p.failure_rate})")
    if p.behavior == "failure":
        raise RetryableError("stub: behavior failure")
    if p.behavior == "error":
        raise RuntimeError("stub: behavior error")
    if p.behavior == "timeout":
        _wait(ctx.timeout + 3600, ctx)  # the worker's time limit interrupts this
    return p.output if p.output is not None else {"task_id": ctx.task_id, "attempt": ctx.attempt}
