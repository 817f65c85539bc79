#!/usr/bin/env python3
"""The Python API: load a plan, submit it, wait for the runs, read and report the results.

    .venv/bin/python examples/producer.py [PLAN] [--junit FILE]   # default: examples/quickstart.yaml

The JUnit XML for CI goes to ``--junit FILE``, else to ``$JUNIT_XML``, else to a new file
in the temporary directory; its path is the last line printed. Nothing is written into
the current directory unless asked.

With ``TASKEXEC_BROKER_URL`` (and ``TASKEXEC_DATABASE_URL``) set, the runs go to that fleet
(`taskexec worker` processes started elsewhere); without, this script starts an embedded
fleet for the duration of the block, as ``taskexec run`` does: a private Redis server, a
SQLite store under ``TASKEXEC_HOME`` and a local worker, all stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
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


def junit_path(named: str | None) -> Path:
    """Where the JUnit XML goes: ``named``, else ``$JUNIT_XML``, else a new temporary file."""
    if named or os.environ.get("JUNIT_XML"):
        return Path(named or os.environ["JUNIT_XML"])
    fd, path = tempfile.mkstemp(prefix="producer-junit-", suffix=".xml")
    os.close(fd)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Submit a plan's runs, wait, report them.")
    parser.add_argument("plan", nargs="?", default=str(Path(__file__).with_name("quickstart.yaml")))
    parser.add_argument(
        "--junit", metavar="FILE", help="write the JUnit XML here (default: $JUNIT_XML or a temp file)"
    )
    args = parser.parse_args(argv)
    results = run(args.plan)
    for r in results:
        print(summary_line(r))
        for t in r.tasks:
            if t.status is not TaskStatus.SUCCEEDED:
                print(f"  {t.id}: {t.status.value} {t.error_code or ''} {t.error_message or ''}")
    report = junit_path(args.junit)
    report.write_text(to_junit(results), encoding="utf-8")
    print(f"JUnit XML for CI: {report}")
    return 0 if all(r.succeeded for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
