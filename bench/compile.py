"""Compile time and peak memory against plan size, with a baseline in the same run.

Plans of 1k, 10k and 100k atomic tasks in groups nested about 5 deep, each task depending
on about 3 earlier tasks. For each size, in a fresh process: the time to validate the plan
(schema) and to compile it, the peak RSS, and a baseline: stdlib ``graphlib`` ordering the
same dependency graph (the bare graph work any compiler must do). Prints ratios.

Each repeat starts from the same heap: the plan document and the previous repeat's plan and
manifest are dropped, and collected, outside the timings (kept alive, they made every
garbage collection inside the timings walk them too). The full collection that the objects
just built are due is run and timed apart ("gc"), so that the baseline does not pay it;
the ratios are printed without and with it.

Run: ``.venv/bin/python bench/compile.py [sizes...]``
"""

from __future__ import annotations

import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from graphlib import TopologicalSorter
from typing import Any

SIZES = [1_000, 10_000, 100_000]
REPEAT = 3


def make_plan(n: int, seed: int = 7) -> dict[str, Any]:
    """A plan of ``n`` atomic tasks: groups 5 deep, ~3 dependencies each, on earlier tasks."""
    rng = random.Random(seed)
    per_leaf_group = 20
    leaves = []
    for i in range(n):
        deps = sorted({f"t{rng.randrange(max(0, i - 200), i)}" for _ in range(3)}) if i >= 3 else []
        leaves.append({"id": f"t{i}", "handler": "stub", "depends_on": deps, "params": {"i": i}})
    # Nest leaves in groups: level 1 groups of 20 leaves, then 4 groups per parent, 5 levels.
    level: list[dict[str, Any]] = [
        {"id": f"g1_{k}", "tasks": leaves[k : k + per_leaf_group]} for k in range(0, n, per_leaf_group)
    ]
    for depth in range(2, 6):
        if len(level) <= 4:
            break
        level = [{"id": f"g{depth}_{k}", "tasks": level[k : k + 4]} for k in range(0, len(level), 4)]
    return {"id": f"bench-{n}", "tasks": level}


def graph_of(plan: dict[str, Any]) -> dict[str, list[str]]:
    graph: dict[str, list[str]] = {}
    todo = list(plan["tasks"])
    while todo:
        node = todo.pop()
        if "tasks" in node:
            todo.extend(node["tasks"])
        else:
            graph[node["id"]] = node["depends_on"]
    return graph


def measure(n: int) -> dict[str, float]:
    """One size, in this process: medians of REPEAT runs, and the peak RSS."""
    from taskexec.plan import parse_plan
    from taskexec.plan.compiler import compile_plan
    from taskexec.settings import Settings

    settings = Settings()
    text = json.dumps(make_plan(n))  # the input is the text; the document itself is dropped
    load, comp, collect, base = [], [], [], []
    for _ in range(REPEAT):
        gc.collect()  # the same heap for every repeat
        t0 = time.perf_counter()
        plan = parse_plan(text)
        t1 = time.perf_counter()
        [manifest] = compile_plan(plan, settings)
        t2 = time.perf_counter()
        gc.collect()  # the full collection that the new objects are due, timed apart
        collect.append(time.perf_counter() - t2)
        load.append(t1 - t0)
        comp.append(t2 - t1)
        built = (len(manifest.tasks), len(manifest.stages))
        del plan, manifest  # freed, and collected, outside the timings: a clean heap for the baseline
        gc.collect()
        t3 = time.perf_counter()
        graph = graph_of(json.loads(text))
        ts = TopologicalSorter(graph)
        ts.prepare()
        stages = 0
        while ts.is_active():
            ready = ts.get_ready()
            ts.done(*ready)
            stages += 1
        base.append(time.perf_counter() - t3)
        assert built == (n, stages)
        del graph, ts
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": n,
        "load": statistics.median(load),
        "compile": statistics.median(comp),
        "gc": statistics.median(collect),
        "baseline": statistics.median(base),
        "rss_mib": rss_mib,
        "stages": stages,
    }


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:] if a.isdigit()] or SIZES
    if "--one" in sys.argv:
        print(json.dumps(measure(sizes[0])))
        return
    results = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n)],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        total = r["load"] + r["compile"]
        print(
            f"{n:>7} tasks: load {r['load']:.3f} s + compile {r['compile']:.3f} s = {total:.3f} s "
            f"(+ gc {r['gc']:.3f} s), {int(r['stages'])} stages, peak RSS {r['rss_mib']:.0f} MiB; "
            f"graphlib baseline {r['baseline']:.3f} s, ratio x{total / r['baseline']:.1f} "
            f"(x{(total + r['gc']) / r['baseline']:.1f} with gc)",
            flush=True,
        )
    by_n = {int(r["n"]): r for r in results}
    if 10_000 in by_n and 100_000 in by_n:
        a, b = by_n[10_000], by_n[100_000]
        ratio = (b["load"] + b["compile"]) / (a["load"] + a["compile"])
        with_gc = (b["load"] + b["compile"] + b["gc"]) / (a["load"] + a["compile"] + a["gc"])
        print(
            f"100k/10k time ratio: x{ratio:.1f}, x{with_gc:.1f} with gc "
            "(linear would be x10.0; goal under x12)"
        )


if __name__ == "__main__":
    main()
