#!/usr/bin/env python3
"""The Python API: load a plan, submit it, wait for the runs, read and report the results.

    .venv/bin/python examples/producer.py [PLAN]        # default: examples/quickstart.yaml

With ``TASKEXEC_BROKER_URL`` (and ``TASKEXEC_DATABASE_URL``) set, the runs go to that fleet
(`taskexec worker` processes started elsewhere); without, this script starts an embedded
fleet for the duration of the block, as ``taskexec run`` does: a private Redis server, a
SQLite store under ``TASKEXEC_HOME`` and a local worker, all stopped at the end.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from taskexec import Client, RunResult, Settings, TaskStatus, load_plan
from taskexec.embedded import EmbeddedFleet
from taskexec.report import summary_line, to_junit


def run(plan_path: str) -> list[RunResult]:
    """Submit every variant of a plan and wait for the runs to end."""
    plan = load_plan(plan_path)  # PlanError (E001) names the bad field
    settings = Settings()  # TASKEXEC_* environment variables
    with contextlib.ExitStack() as stack:
        fleet = None
        if settings.embedded:
            fleet = stack.enter_context(EmbeddedFleet(settings.home, base=settings))
            settings = fleet.settings  # the embedded Redis and SQLite
        client = stack.enter_context(Client(settings))
        handles = client.submit_all(plan, labels={"submitted-by": "examples/producer.py"})
        if fleet is not None:
            fleet.runs.extend(h.run_id for h in handles)  # settled if we stop early
        return [h.wait(timeout=600) for h in handles]


def main() -> int:
    plan_path = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("quickstart.yaml"))
    results = run(plan_path)
    for r in results:
        print(summary_line(r))
        for t in r.tasks:
            if t.status is not TaskStatus.SUCCEEDED:
                print(f"  {t.id}: {t.status.value} {t.error_code or ''} {t.error_message or ''}")
    report = Path("producer-junit.xml")
    report.write_text(to_junit(results), encoding="utf-8")
    print(f"JUnit XML for CI: {report}")
    return 0 if all(r.succeeded for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
