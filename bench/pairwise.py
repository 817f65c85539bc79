"""Pairwise suite size, time, coverage and memory, against allpairspy run live and PICT's figures.

Models are written ``4^15 3^17 2^29`` (15 parameters of 4 values, 17 of 3, 29 of 2). For
each model of issue 19's table: the size and time of ``taskexec.plan.matrix.expand`` at the
default effort, allpairspy called directly on the same model (the baseline, in this run),
PICT 3.7's best of 50 seeds and the best known size (from the issue: PICT is not installed
here), the lower bound, the ratios, and the share of value tuples each suite covers,
counted here from the cases. Then: thorough effort on the four hardest models; strength 3;
exclusions (reachable pairs computed here, by brute force over the parameters the
exclusions link); memory over 100 expansions in one process; the same suites from
processes with other hash seeds. Every goal line says "met" or "MISSED by N".

Run: ``.venv/bin/python bench/pairwise.py`` (about 5 minutes here; ``--quick`` skips the
thorough line and the memory line).
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

from taskexec.plan.matrix import MatrixSpec, expand

FOURTEEN = "2^1 3^1 4^1 5^1 6^1 2^1 3^1 4^1 5^1 6^1 2^1 3^1 4^1 5^1"
# model: (best known, PICT 3.7 best of 50 seeds), issue 19's table.
TABLE: dict[str, tuple[int, int]] = {
    "3^4": (9, 9),
    "3^13": (15, 18),
    "4^15 3^17 2^29": (29, 37),
    "4^1 3^39 2^35": (21, 27),
    "2^100": (10, 15),
    "10^20": (155, 211),
    "5^10": (36, 45),
    "8^1 7^1 6^1 5^1 4^1 3^1": (56, 56),
    "6^20": (61, 81),
    "3^100": (22, 32),
    FOURTEEN: (36, 41),
}
NEAR_BEST = ["3^4", "3^13", "4^15 3^17 2^29", "4^1 3^39 2^35", "2^100", "8^1 7^1 6^1 5^1 4^1 3^1", FOURTEEN]
THOROUGH = {"10^20": 185, "5^10": 38, "6^20": 67, "3^100": 25}
STRENGTH3_PICT = {"3^4": 33, "3^13": 74, "5^10": 308, FOURTEEN: 268}
# Exclusions the issue measured PICT with (its figures; the exclusions are ours: pairs of
# values, as PICT's "IF [A] = x THEN [B] <> y" rules).
EXCLUSIONS: dict[str, tuple[list[dict[str, int]], int]] = {
    "3^13": ([{"p0": 0, "p1": 0}, {"p2": 1, "p3": 2}, {"p0": 2, "p4": 1}], 20),
    "10^20": (
        [{"p0": 0, "p1": 0}, {"p2": 1, "p3": 1}, {"p4": 2, "p5": 2}, {"p0": 3, "p6": 3}, {"p7": 4, "p8": 4}],
        214,
    ),
}
# A model whose exclusions leave some pairs unreachable: small enough for a brute-force
# product (82,944 rows); allpairspy's filter_func misses some of its reachable pairs.
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
REPEAT = 3  # median of, at the default effort
RUNS = 100  # expansions in the memory line
MEMORY_MODEL = "5^10"
DEFAULT_SECONDS, THOROUGH_SECONDS = 2.0, 30.0

Row = Sequence[int]
Tuple = tuple[tuple[int, int], ...]


def sizes_of(model: str) -> list[int]:
    """``"4^2 3^1"`` -> ``[4, 4, 3]``."""
    out: list[int] = []
    for term in model.split():
        size, count = term.split("^")
        out += [int(size)] * int(count)
    return out


def label(model: str) -> str:
    if model.startswith("8^1 7^1"):
        return "8·7·6·5·4·3"
    return "14 params" if model == FOURTEEN else model


def spec_of(sizes: Sequence[int], exclude: list[dict[str, Any]] | None = None, **options: Any) -> MatrixSpec:
    params = {f"p{i}": list(range(s)) for i, s in enumerate(sizes)}
    return MatrixSpec(strategy="pairwise", params=params, exclude=exclude or [], **options)


def ours(sizes: Sequence[int], exclude: list[dict[str, Any]] | None = None, **options: Any) -> list[Row]:
    return [list(case.values()) for case in expand(spec_of(sizes, exclude, **options)).cases]


def matches(row: Row, entry: dict[str, Any]) -> bool:
    return all(row[int(k[1:])] == v for k, v in entry.items())


def direct(sizes: Sequence[int], exclude: list[dict[str, Any]] | None = None) -> list[Row]:
    """allpairspy as its README shows it: a filter rejecting prefixes an exclusion matches."""
    rules = exclude or []

    def allowed(row: list[int]) -> bool:
        return not any(
            all(int(k[1:]) < len(row) and row[int(k[1:])] == v for k, v in e.items()) for e in rules
        )

    return [list(r) for r in AllPairs([list(range(s)) for s in sizes], filter_func=allowed)]


def tuples(rows: Iterable[Row], t: int = 2) -> set[Tuple]:
    return {tuple((c, r[c]) for c in cols) for r in rows for cols in itertools.combinations(range(len(r)), t)}


def count_all(sizes: Sequence[int], t: int = 2) -> int:
    return sum(math.prod(sizes[c] for c in cols) for cols in itertools.combinations(range(len(sizes)), t))


def reachable_pairs(sizes: Sequence[int], exclude: list[dict[str, int]]) -> set[Tuple]:
    """The pairs some allowed row holds, by brute force over each group of linked parameters.

    Parameters that exclusions link form groups; each group's allowed assignments are
    enumerated, and a pair across groups (or with a free parameter) is reachable when each
    of its values is: exact, and independent of taskexec's own search.
    """
    group = list(range(len(sizes)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for entry in exclude:
        keys = [int(k[1:]) for k in entry]
        for k in keys[1:]:
            group[root(k)] = root(keys[0])
    members: dict[int, list[int]] = {}
    for i in range(len(sizes)):
        members.setdefault(root(i), []).append(i)
    single: set[tuple[int, int]] = set()
    inner: set[Tuple] = set()
    for cols in members.values():
        for combo in itertools.product(*(range(sizes[c]) for c in cols)):
            row = dict(zip(cols, combo, strict=True))
            if any(all(row.get(int(k[1:])) == v for k, v in e.items()) for e in exclude):
                continue
            single.update(row.items())
            inner.update(((a, row[a]), (b, row[b])) for a, b in itertools.combinations(cols, 2))
    out = set(inner)
    for (a, x), (b, y) in itertools.combinations(sorted(single), 2):
        if a != b and root(a) != root(b):
            out.add(((a, x), (b, y)))
    return out


def timed(fn: Callable[[], list[Row]], repeat: int = REPEAT) -> tuple[list[Row], float]:
    times, rows = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - t0)
    return rows, statistics.median(times)


def goal(ok: bool, missed_by: str) -> str:
    return "met" if ok else f"MISSED by {missed_by}"


def cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


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


def default_effort() -> list[str]:
    lines, over_base, far, slow = [], 0, 0, 0
    for model, (best, pict) in TABLE.items():
        sizes = sizes_of(model)
        mine, t_mine = timed(lambda sizes=sizes: ours(sizes))  # type: ignore[misc]
        base, t_base = timed(lambda sizes=sizes: direct(sizes), 1 if len(sizes) > 50 else REPEAT)  # type: ignore[misc]
        total = count_all(sizes)
        cov_mine, cov_base = 100 * len(tuples(mine)) / total, 100 * len(tuples(base)) / total
        bound = math.prod(sorted(sizes)[-2:])
        n = len(mine)
        over_base += n > min(pict, len(base)) or cov_mine != 100
        near = model not in NEAR_BEST or n <= 1.1 * best
        far += not near
        slow += t_mine >= DEFAULT_SECONDS
        print(
            f"{label(model):<15} {len(sizes):>3} params: taskexec {n:>4} cases {t_mine:5.2f} s "
            f"{cov_mine:5.1f}% pairs | allpairspy {len(base):>4} cases {t_base:5.2f} s {cov_base:5.1f}% | "
            f"PICT {pict:>4} | best known {best:>4} | lower bound {bound:>3} | x{n / len(base):.2f} of "
            f"allpairspy, x{n / pict:.2f} of PICT, x{n / best:.2f} of best known",
            flush=True,
        )
    lines.append(
        "goal, default effort: never above PICT or allpairspy, 100% pairs "
        f"{goal(not over_base, f'{over_base} models')}; "
        f"within 10% of best known on {len(NEAR_BEST)} models {goal(not far, f'{far} models')}; "
        f"every model under {DEFAULT_SECONDS:.0f} s {goal(not slow, f'{slow} models')}"
    )
    return lines


def thorough() -> list[str]:
    lines = []
    for model, target in THOROUGH.items():
        sizes = sizes_of(model)
        mine, t_mine = timed(lambda sizes=sizes: ours(sizes, effort="thorough"), 1)  # type: ignore[misc]
        cov = 100 * len(tuples(mine)) / count_all(sizes)
        n = len(mine)
        print(
            f"thorough {label(model):<7}: {n:>4} cases {t_mine:5.1f} s {cov:5.1f}% pairs | best known "
            f"{TABLE[model][0]}, PICT {TABLE[model][1]} | x{n / TABLE[model][0]:.2f} of best known",
            flush=True,
        )
        ok = n <= target and cov == 100 and t_mine < THOROUGH_SECONDS
        misses = [cases(n - target)] if n > target else []
        misses += [f"{t_mine - THOROUGH_SECONDS:.1f} s"] if t_mine >= THOROUGH_SECONDS else []
        misses += [f"{100 - cov:.1f}% pairs"] if cov < 100 else []
        why = " and ".join(misses)
        lines.append(
            f"goal, thorough {label(model)} <= {target} in under {THOROUGH_SECONDS:.0f} s: {goal(ok, why)}"
        )
    return lines


def strength3() -> list[str]:
    lines = []
    for model, pict in STRENGTH3_PICT.items():
        sizes = sizes_of(model)
        mine, t_mine = timed(lambda sizes=sizes: ours(sizes, strength=3), 1)  # type: ignore[misc]
        base, t_base = timed(
            lambda sizes=sizes: [list(r) for r in AllPairs([list(range(s)) for s in sizes], n=3)], 1
        )  # type: ignore[misc]
        total = count_all(sizes, 3)
        cov, cov_base = 100 * len(tuples(mine, 3)) / total, 100 * len(tuples(base, 3)) / total
        n = len(mine)
        print(
            f"strength 3 {label(model):<9}: taskexec {n:>4} cases {t_mine:5.2f} s {cov:5.1f}% triples | "
            f"allpairspy n=3 {len(base):>4} cases {t_base:5.2f} s {cov_base:5.1f}% triples | PICT {pict} | "
            f"lower bound {math.prod(sorted(sizes)[-3:])} | x{n / pict:.2f} of PICT",
            flush=True,
        )
        ok = n <= pict and cov == 100
        why = cases(n - pict) if n > pict else f"{100 - cov:.1f}% triples"
        lines.append(f"goal, strength 3 {label(model)} <= PICT's {pict}, every triple: {goal(ok, why)}")
    return lines


def exclusions() -> list[str]:
    lines = []
    for model, (exclude, pict) in EXCLUSIONS.items():
        sizes = sizes_of(model)
        reach = reachable_pairs(sizes, exclude)
        mine, t_mine = timed(lambda sizes=sizes, exclude=exclude: ours(sizes, exclude))  # type: ignore[misc]
        base, t_base = timed(lambda sizes=sizes, exclude=exclude: direct(sizes, exclude), 1)  # type: ignore[misc]
        bad = sum(1 for r in mine if any(matches(r, e) for e in exclude))
        cov = 100 * len(tuples(mine) & reach) / len(reach)
        cov_base = 100 * len(tuples(base) & reach) / len(reach)
        n = len(mine)
        print(
            f"{label(model)} with {len(exclude)} excluded pairs "
            f"({len(reach)} of {count_all(sizes)} pairs reachable): "
            f"taskexec {n} cases {t_mine:.2f} s, {cov:.1f}% of reachable pairs, {bad} excluded cases | "
            f"allpairspy + filter_func {len(base)} cases {t_base:.2f} s, {cov_base:.1f}% | PICT {pict}",
            flush=True,
        )
        ok = n <= pict and cov == 100 and bad == 0
        why = cases(n - pict) if n > pict else f"{100 - cov:.1f}% pairs, {cases(bad)} excluded"
        lines.append(
            f"goal, {label(model)} minus {len(exclude)} pairs: 100% of reachable pairs, no excluded case, "
            f"<= PICT's {pict}: {goal(ok, why)}"
        )
    sizes = sizes_of(EXCLUDE_MODEL)
    allowed = [r for r in itertools.product(*map(range, sizes)) if not any(matches(r, e) for e in EXCLUDE)]
    reach = tuples(allowed)
    mine, t_mine = timed(lambda: ours(sizes, EXCLUDE))
    base, t_base = timed(lambda: direct(sizes, EXCLUDE))
    bad = sum(1 for r in mine if any(matches(r, e) for e in EXCLUDE))
    cov, cov_base = 100 * len(tuples(mine) & reach) / len(reach), 100 * len(tuples(base) & reach) / len(reach)
    print(
        f"{EXCLUDE_MODEL} with {len(EXCLUDE)} exclusions ({len(reach)} of {count_all(sizes)} pairs "
        f"reachable, by brute force): taskexec {len(mine)} cases {t_mine:.2f} s, {cov:.1f}% of reachable "
        f"pairs, {bad} excluded cases | allpairspy + filter_func {len(base)} cases {t_base:.2f} s, "
        f"{cov_base:.1f}% of reachable pairs",
        flush=True,
    )
    ok = cov == 100 and bad == 0 and len(mine) <= len(base)
    lines.append(
        f"goal, {EXCLUDE_MODEL} with {len(EXCLUDE)} exclusions: 100%, none excluded, <= allpairspy: "
        f"{goal(ok, cases(len(mine) - len(base)))}"
    )
    return lines


def flat_memory() -> list[str]:
    mem = {}
    for which in ("taskexec", "allpairspy"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory", which],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
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
    grown = grow["taskexec"]
    return [f"goal, memory flat over {RUNS} calls (under 1 MiB): {goal(grown < 1.0, f'{grown:.1f} MiB')}"]


def identical() -> list[str]:
    """The same suites from two more processes, with other hash seeds."""
    models = ["3^13", "4^1 3^39 2^35", FOURTEEN]
    specs = [spec_of(sizes_of(m)) for m in models] + [spec_of(sizes_of("3^13"), *EXCLUSIONS["3^13"][:1])]
    here = [expand(s).cases for s in specs]
    code = (
        "import json, sys; from taskexec.plan.matrix import MatrixSpec, expand; "
        "print(json.dumps([expand(MatrixSpec.model_validate(s)).cases for s in json.load(sys.stdin)]))"
    )
    same = True
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps([s.model_dump() for s in specs]),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        same &= json.loads(out.stdout) == here
    print(
        f"identical suites from processes with PYTHONHASHSEED 0 and 12345 ({len(specs)} models): {same}",
        flush=True,
    )
    return [f"goal, identical across processes: {goal(same, 'a differing suite')}"]


def main() -> None:
    if "--memory" in sys.argv:
        print(json.dumps(memory(sys.argv[-1])))
        return
    quick = "--quick" in sys.argv
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    lines = default_effort()
    if not quick:
        lines += thorough()
    lines += strength3() + exclusions()
    if not quick:
        lines += flat_memory()
    lines += identical()
    for line in lines:
        print(line)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
