"""Python handlers for tests/test_logs.py (allowed with ``python:tests``): they log and raise."""

from __future__ import annotations

from typing import Any


def noisy_failure(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Log a line at INFO (and one at DEBUG, not kept), then raise with the token in the message."""
    ctx.logger.info("starting with token %s", params.get("token", "none"))
    ctx.logger.debug("a debug line")
    return _explode(str(params.get("token", "none")))


def _explode(token: str) -> dict[str, Any]:
    raise ValueError(f"cannot use token {token}")
