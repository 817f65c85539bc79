"""A handler module that takes a while to import, like one that loads a client library.

Only the rate-limit test of ``test_flow_control`` uses it, so each worker process
imports it for that test's first task.
"""

from __future__ import annotations

import time
from typing import Any

time.sleep(0.5)
IMPORTED_AT = time.time()


def imported_at(params: dict[str, Any], inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """When this process finished importing the module, and when the handler started."""
    return {"imported_at": IMPORTED_AT, "started_at": time.time()}
