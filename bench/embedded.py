"""Embedded mode: `taskexec run examples/quickstart.yaml` from start to exit, split in phases.

Each repetition runs the real command in a fresh process with a fresh ``TASKEXEC_HOME``
(``taskexec --debug run`` prints its embedded fleet's phase timings on stderr) and splits
the wall time into:

* **cli**: interpreter start, imports, loading and compiling the plan, printing, exit;
* **startup**: Redis up, store migrated, worker answering (what the goal calls Redis +
  workers ready);
* **execution**: submit to the last run's end, as the command saw it;
* **shutdown**: runs settled, worker warm shutdown, Redis stopped.

The baseline, in the same run: the plan's own **critical path**, the longest dependency
chain of the run's tasks weighted by how long each took (first attempt's start to its
end, as stored): the time the plan needs with unlimited workers and no overhead at all.
Goals: startup under 3 s; total minus critical path under 4 s. Medians are printed.

Run from the repository root: ``.venv/bin/python bench/embedded.py [--repeat N]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "examples" / "quickstart.yaml"
STARTUP_GOAL, OVERHEAD_GOAL = 3.0, 4.0


def critical_path(result: dict[str, Any], depends_on: dict[str, list[str]]) -> float:
    """Seconds of the longest dependency chain, each task weighted by its stored duration."""
    took = {}
    for t in result["tasks"]:
        if t["started_at"] and t["finished_at"]:
            start, end = datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["finished_at"])
            took[t["id"]] = max(0.0, (end - start).total_seconds())
    longest: dict[str, float] = {}

    def chain(task: str) -> float:
        if task not in longest:
            longest[task] = took.get(task, 0.0) + max((chain(d) for d in depends_on[task]), default=0.0)
        return longest[task]

    return max((chain(t) for t in depends_on), default=0.0)


def once(depends_on: dict[str, list[str]]) -> dict[str, float]:
    """One `taskexec --debug run PLAN --json` in a fresh home: its phases, in seconds."""
    home = Path(tempfile.mkdtemp(prefix="tx-bench-", dir="/tmp")) / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    env["TASKEXEC_HOME"] = str(home)
    command = [str(Path(sys.executable).with_name("taskexec")), "--debug", "run", str(PLAN), "--json"]
    try:
        t0 = time.monotonic()
        p = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
        total = time.monotonic() - t0
    finally:
        shutil.rmtree(home.parent, ignore_errors=True)
    if p.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` exited {p.returncode}: {p.stderr[-2000:]}")
    match = re.search(r"embedded timings: (.*)", p.stderr)
    if match is None:
        raise SystemExit(f"no timings on stderr: {p.stderr[-2000:]}")
    phases = {k: float(v) for k, v in (kv.split("=") for kv in match.group(1).split())}
    [result] = json.loads(p.stdout)
    path = critical_path(result, depends_on)
    return {
        "total": total,
        "startup": phases["startup"],
        "execution": phases["execution"],
        "shutdown": phases["shutdown"],
        "cli": total - phases["startup"] - phases["execution"] - phases["shutdown"],
        "critical_path": path,
        "overhead": total - path,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (medians are printed)")
    args = parser.parse_args()

    from taskexec.plan import load_plan
    from taskexec.plan.compiler import compile_plan

    [manifest] = compile_plan(load_plan(str(PLAN)))
    depends_on = {t.id: t.depends_on for t in manifest.tasks}
    once(depends_on)  # warm the page cache: imports, the redis-server binary
    runs = [once(depends_on) for _ in range(args.repeat)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"embedded `taskexec run {PLAN.relative_to(ROOT)}`: median of {args.repeat}, seconds")
    print(
        f"  total {med['total']:.2f} = cli {med['cli']:.2f} + startup {med['startup']:.2f} "
        f"+ execution {med['execution']:.2f} + shutdown {med['shutdown']:.2f}"
    )
    print(
        f"  baseline: the plan's critical path {med['critical_path']:.2f}; "
        f"total/critical path {med['total'] / med['critical_path']:.1f}x"
    )
    ok_start = med["startup"] < STARTUP_GOAL
    ok_over = med["overhead"] < OVERHEAD_GOAL
    print(f"  startup {med['startup']:.2f} (goal < {STARTUP_GOAL:g}): {'ok' if ok_start else 'MISSED'}")
    print(
        f"  overhead over the critical path {med['overhead']:.2f} (goal < {OVERHEAD_GOAL:g}): "
        f"{'ok' if ok_over else 'MISSED'}"
    )
    print(
        "  per run (total / startup / execution / shutdown / critical path): "
        + ", ".join(
            f"{r['total']:.2f}/{r['startup']:.2f}/{r['execution']:.2f}/{r['shutdown']:.2f}/{r['critical_path']:.2f}"
            for r in runs
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
