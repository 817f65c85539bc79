"""A pairwise suite's first draft and its bounds: allpairspy within a budget of work, the
draft's size and time estimated before any work, and the cases kept under ``max_cases``."""

from __future__ import annotations

import heapq
import math
import threading

from allpairspy import AllPairs, pairs_storage

from taskexec.plan.covering import Constraints, Row, Tuples, lower_bound

__all__ = ["allpairs", "draft_cost", "most_covering", "tuple_count"]

#: allpairspy's work per second here, in the units of _allpairs's cost model (fitted on a
#: dozen shapes; 2^100 costs 5.4 M units in 1.2 s).
_ALLPAIRS_RATE = 4_500_000


# allpairspy memoises every value combination it meets in a module-level dict
# (pairs_storage.key_cache) keyed by its per-call Item objects, so the dict only grows:
# megabytes per call in a long-lived producer. Entries are garbage once a call ends, so
# each call is followed by a clear. The lock keeps two of our calls (threads) from clearing
# under each other; a foreign caller of allpairspy in another thread could still lose a
# cache entry mid-lookup, which no public allpairspy API lets us avoid.
_ALLPAIRS_LOCK = threading.Lock()


class _OutOfBudget(Exception):
    """allpairspy spent its budget: keep the cases it built so far."""


def _allpairs_unit(k: int, size: int) -> int:
    # allpairspy offers no hook, so its work is counted from outside. Choosing the k-th value
    # weighs every candidate against the k-1 chosen ones, then sorts them: a fit of its run
    # time over a dozen model shapes gives size * (k^2/2 + 1.6 k + 12 + 0.7 log2 size), within 15%.
    return size * (k * k + 3 * k + 24 + size.bit_length()) // 2


def allpairs(cons: Constraints, order: list[int], budget: int) -> tuple[list[Row], int, bool]:
    """allpairspy's suite with the parameters in ``order``, as rows in declaration order.

    Returns:
        The rows, the work spent and whether allpairspy finished within ``budget``.
    """
    sizes = [cons.sizes[i] for i in order]
    n = len(order)
    spent = 0
    check_cost = 3 * sum(len(rule) for rule in cons.rules)  # completable() below, in these units

    def viable(partial: list[int]) -> bool:
        nonlocal spent
        spent += _allpairs_unit(len(partial), sizes[len(partial) - 1]) + check_cost
        if spent > budget:
            raise _OutOfBudget
        if not cons.rules:
            return True
        row: list[int | None] = [None] * n
        for pos, v in enumerate(partial):
            row[order[pos]] = v
        # Completability, not just "no exclusion matched yet": allpairspy backtracks one
        # parameter at a time, exponentially, out of a prefix that only looks viable.
        return cons.completable(row)

    rows: list[Row] = []
    complete = True
    with _ALLPAIRS_LOCK:
        try:
            for found in AllPairs([list(range(s)) for s in sizes], filter_func=viable):
                row = [0] * n
                for pos, v in enumerate(found):
                    row[order[pos]] = v
                rows.append(tuple(row))
        except _OutOfBudget:
            complete = False
        finally:
            pairs_storage.key_cache.clear()
    return rows, spent, complete


def tuple_count(sizes: list[int], t: int) -> int:
    """The value t-tuples of a model: the t-th elementary symmetric sum of its sizes."""
    e = [1] + [0] * t
    for s in sizes:
        for j in range(t, 0, -1):
            e[j] += e[j - 1] * s
    return e[t]


def draft_cost(sizes: list[int], t: int, allpairs_budget: int, tries: int) -> tuple[int, float, bool]:
    """Before any work: the draft's rows and seconds (estimated), and whether allpairspy makes it.

    Rows: the lower bound times ln(parameters), within 30% of what greedy builders give on
    the benchmark's models. Seconds: allpairspy's cost model at strength 2 when it fits its
    budget, else the greedy builder's: for each row, each column weighs its values against
    every (t-1)-set of the columns set before it, in byte lanes at strength 2 (5^200: 11.6 s
    measured, 10.7 estimated, two tries a row), one tuple at a time above (2^16 at strength
    4: 1.6 s, 3^13 at strength 3: 0.4 s).
    """
    k = len(sizes)
    rows = max(lower_bound(sizes, t), round(lower_bound(sizes, t) * math.log(k)))
    if t == 2:
        per_row = sum(_allpairs_unit(p + 1, s) for p, s in enumerate(sizes))
        if rows * per_row <= allpairs_budget:
            return rows, rows * per_row / _ALLPAIRS_RATE, True
    if t == 2:
        per_row = sum(12 * p + 4 * s for p, s in enumerate(sizes))
    else:
        per_row = sum(math.comb(p, t - 1) * (4 * t + s) for p, s in enumerate(sizes)) * 10 // 3
    return rows, rows * per_row * tries / 6_000_000, False


def most_covering(rows: list[Row], keep: int, tuples: Tuples, limit: int) -> tuple[list[Row], int]:
    """The first ``keep`` rows, then those that cover the most tuples, picked greedily, up to ``limit``.

    Coverage is submodular: a row's gain only falls as rows are picked, so a popped row whose
    fresh gain still tops the heap is the greedy choice without re-scoring the others.
    """
    seen = bytearray(tuples.total)
    picked: list[Row] = []
    covered = 0
    heap = [(-len(tuples.sets), r) for r in range(keep, len(rows))]  # every row's gain bound
    for r in range(keep):
        fresh = [i for i in tuples.index(rows[r]) if not seen[i]]
        for i in fresh:
            seen[i] = 1
        covered += len(fresh)
        picked.append(rows[r])
    while heap and len(picked) < limit:
        _, r = heapq.heappop(heap)
        fresh = [i for i in tuples.index(rows[r]) if not seen[i]]
        if heap and len(fresh) < -heap[0][0]:
            heapq.heappush(heap, (-len(fresh), r))
            continue
        for i in fresh:
            seen[i] = 1
        covered += len(fresh)
        picked.append(rows[r])
    return picked, covered
