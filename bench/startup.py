"""Start-up: wall time of short commands, against a bare interpreter in the same run.

Each command runs ``--repeat`` times in a fresh interpreter (``python -m taskexec.cli``, as
the ``taskexec`` script does); the baseline is ``python -c pass`` (the interpreter's own
start-up, which no command can go under) and ``python -c "import click"`` (the CLI
framework). Prints the median of each, its ratio to the baseline and the goal (issue 20:
``--help`` and ``validate`` of a small plan under 0.3 s).

Run: ``.venv/bin/python -m bench.startup [--repeat N]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from bench.services import ROOT, loadavg

GOAL = 0.3


def _wall(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    py = sys.executable
    print(f"load average before: {loadavg()}", flush=True)
    bare = _wall([py, "-c", "pass"], args.repeat)
    click = _wall([py, "-c", "import click"], args.repeat)
    print(f"baseline: python -c pass {bare * 1000:.0f} ms, python -c 'import click' {click * 1000:.0f} ms")
    for label, argv, goal in (
        ("taskexec --help", ["--help"], GOAL),
        ("taskexec validate examples/quickstart.yaml", ["validate", "examples/quickstart.yaml"], GOAL),
        ("taskexec compile examples/quickstart.yaml", ["compile", "examples/quickstart.yaml"], None),
    ):
        t = _wall([py, "-m", "taskexec.cli", *argv], args.repeat)
        verdict = "" if goal is None else f" (goal < {goal * 1000:.0f} ms: {'met' if t < goal else 'MISSED'})"
        ratio = f"x{t / bare:.1f} a bare interpreter"
        print(f"{label}: median {t * 1000:.0f} ms of {args.repeat}, {ratio}{verdict}")
    print(f"load average after: {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
