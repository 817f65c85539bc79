"""The ``approval`` handler: a gate that waits for a person's decision.

Params: ``message`` (what to decide, shown by ``status`` and the live view), ``timeout``
(seconds, optional: no decision in time rejects the task, E012).

The task goes to ``waiting_approval`` and its worker moves on at once: nothing holds a
worker slot while people think. ``taskexec approve RUN TASK`` (or ``--reject --reason``),
or :meth:`taskexec.Client.approve`, decides; the branch behind the gate waits meanwhile,
and independent branches run on.

Example plan task::

    - id: go-live
      handler: approval
      depends_on: [staging-tests]
      params: {message: "Deploy build 42 to production?", timeout: 86400}
"""

from __future__ import annotations

from typing import Any

from taskexec.errors import AwaitApproval
from taskexec.handlers import ApprovalParams, HandlerContext, handler, parse_params

__all__ = ["ApprovalParams", "approval"]


@handler("approval", params=ApprovalParams)
def approval(params: dict[str, Any], inputs: dict[str, Any], ctx: HandlerContext) -> dict[str, Any]:
    """Ask for a decision: the task waits in ``waiting_approval``."""
    p = parse_params(ApprovalParams, params, "approval")
    raise AwaitApproval(p.message, timeout=p.timeout)
