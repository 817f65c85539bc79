"""Pairwise suite size, time, coverage and memory, against allpairspy run directly.

For each model (``4^15 3^17 2^29`` means 15 parameters of 4 values, 17 of 3, 29 of 2): the
size and time of ``taskexec.matrix.expand`` and of allpairspy called directly on the same
model (the baseline, same process), the lower bound (product of the two largest domains),
the ratios, and the share of value pairs each suite covers, counted here from the cases.
Then a model with exclusions: the reachable pairs come from a brute-force product, and
allpairspy gets the usual ``filter_func``. Last, memory: resident set size before and after
100 expansions in one process, for taskexec and for allpairspy alone (fresh processes).

Goal: 100% coverage everywhere, size never above allpairspy's, memory flat over 100 runs.

Run: ``.venv/bin/python bench/pairwise.py``
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from allpairspy import AllPairs

from taskexec.matrix import MatrixSpec, expand

MODELS = [
    "3^4",
    "3^13",
    "4^15 3^17 2^29",
    "4^1 3^39 2^35",
    "2^100",
    "10^20",
    "5^10",
    "8^1 7^1 6^1 5^1 4^1 3^1",
]
REPEAT = 3  # median of
RUNS = 100  # expansions in the memory line
MEMORY_MODEL = "5^10"
# The exclusions model: small enough for a brute-force product (82,944 rows).
EXCLUDE_MODEL = "4^4 3^4 2^2"
EXCLUDE = [
    {"p0": 0, "p1": 0},
    {"p0": 1, "p2": 2},
    {"p1": 3, "p3": 3},
    {"p4": 0, "p5": 1, "p6": 2},
    {"p2": 1, "p7": 2, "p8": 0},
    {"p3": 0, "p9": 1},
    {"p5": 2},
    {"p0": 2, "p4": 1, "p9": 0},
    {"p6": 0, "p7": 0},
    {"p1": 2, "p8": 1, "p9": 1},
]

Row = Sequence[int]


def sizes_of(model: str) -> list[int]:
    """``"4^2 3^1"`` -> ``[4, 4, 3]``."""
    out: list[int] = []
    for term in model.split():
        size, count = term.split("^")
        out += [int(size)] * int(count)
    return out


def label(model: str) -> str:
    return "8·7·6·5·4·3" if model.startswith("8^1 7^1") else model


def spec_of(sizes: Sequence[int], exclude: list[dict[str, Any]] | None = None) -> MatrixSpec:
    return MatrixSpec(
        strategy="pairwise",
        params={f"p{i}": list(range(s)) for i, s in enumerate(sizes)},
        exclude=exclude or [],
    )


def ours(sizes: Sequence[int], exclude: list[dict[str, Any]] | None = None) -> list[Row]:
    spec = spec_of(sizes, exclude)
    return [list(case.values()) for case in expand(spec).cases]


def matches(row: Row, entry: dict[str, Any]) -> bool:
    return all(int(k[1:]) < len(row) and row[int(k[1:])] == v for k, v in entry.items())


def direct(sizes: Sequence[int], exclude: list[dict[str, Any]] | None = None) -> list[Row]:
    """allpairspy as its README shows it: a filter rejecting prefixes an exclusion matches."""
    rules = exclude or []

    def allowed(row: list[int]) -> bool:
        return not any(matches(row, entry) for entry in rules)

    return [list(r) for r in AllPairs([list(range(s)) for s in sizes], filter_func=allowed)]


def pairs(rows: Iterable[Row]) -> set[tuple[int, int, int, int]]:
    return {(i, r[i], j, r[j]) for r in rows for i, j in itertools.combinations(range(len(r)), 2)}


def timed(fn: Callable[[], list[Row]]) -> tuple[list[Row], float]:
    times, rows = [], []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - t0)
    return rows, statistics.median(times)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(which: str) -> dict[str, float]:
    """RSS before and after RUNS expansions of MEMORY_MODEL, in this (fresh) process."""
    sizes = sizes_of(MEMORY_MODEL)
    run = (lambda: ours(sizes)) if which == "taskexec" else (lambda: direct(sizes))
    run()  # imports, first allocations
    gc.collect()
    before = rss_mib()
    for _ in range(RUNS):
        run()
    gc.collect()
    return {"before": before, "after": rss_mib()}


def main() -> None:
    if "--memory" in sys.argv:
        print(json.dumps(memory(sys.argv[-1])))
        return
    ok_cover, ok_size = True, True
    for model in MODELS:
        sizes = sizes_of(model)
        total = sum(a * b for a, b in itertools.combinations(sizes, 2))
        bound = math.prod(sorted(sizes)[-2:])
        mine, t_mine = timed(lambda sizes=sizes: ours(sizes))  # type: ignore[misc]
        base, t_base = timed(lambda sizes=sizes: direct(sizes))  # type: ignore[misc]
        cov_mine = 100 * len(pairs(mine)) / total
        cov_base = 100 * len(pairs(base)) / total
        ok_cover &= cov_mine == 100
        ok_size &= len(mine) <= len(base)
        print(
            f"{label(model):<15} {len(sizes):>3} params: taskexec {len(mine):>4} cases {t_mine:6.2f} s "
            f"{cov_mine:5.1f}% pairs | allpairspy {len(base):>4} cases {t_base:6.2f} s {cov_base:5.1f}% | "
            f"lower bound {bound:>3}: x{len(mine) / bound:.2f} of bound, "
            f"x{len(mine) / len(base):.2f} of allpairspy",
            flush=True,
        )

    sizes = sizes_of(EXCLUDE_MODEL)
    allowed = [r for r in itertools.product(*map(range, sizes)) if not any(matches(r, e) for e in EXCLUDE)]
    reachable = pairs(allowed)
    total = sum(a * b for a, b in itertools.combinations(sizes, 2))
    mine, t_mine = timed(lambda: ours(sizes, EXCLUDE))
    base, t_base = timed(lambda: direct(sizes, EXCLUDE))
    bad = sum(1 for r in mine if any(matches(r, e) for e in EXCLUDE))
    cov_mine = 100 * len(pairs(mine) & reachable) / len(reachable)
    cov_base = 100 * len(pairs(base) & reachable) / len(reachable)
    ok_cover &= cov_mine == 100 and bad == 0
    print(
        f"{EXCLUDE_MODEL} with {len(EXCLUDE)} exclusions ({len(reachable)} of {total} pairs reachable, "
        f"by brute force): taskexec {len(mine)} cases {t_mine:.2f} s, {cov_mine:.1f}% of reachable pairs, "
        f"{bad} excluded cases | allpairspy + filter_func {len(base)} cases {t_base:.2f} s, "
        f"{cov_base:.1f}% of reachable pairs",
        flush=True,
    )

    mem = {}
    for which in ("taskexec", "allpairspy"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory", which],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        mem[which] = json.loads(out.stdout.strip().splitlines()[-1])
    grow = {k: v["after"] - v["before"] for k, v in mem.items()}
    print(
        f"memory, {RUNS} expansions of {MEMORY_MODEL} in one process: taskexec RSS "
        f"{mem['taskexec']['before']:.1f} -> {mem['taskexec']['after']:.1f} MiB ({grow['taskexec']:+.1f}) | "
        f"allpairspy alone {mem['allpairspy']['before']:.1f} -> {mem['allpairspy']['after']:.1f} MiB "
        f"({grow['allpairspy']:+.1f})",
        flush=True,
    )
    flat = grow["taskexec"] < 1.0
    print(
        f"goal: 100% coverage everywhere {'met' if ok_cover else 'MISSED'}; size never above allpairspy's "
        f"{'met' if ok_size else 'MISSED'}; memory flat {'met' if flat else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
