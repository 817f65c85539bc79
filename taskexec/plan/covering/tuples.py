"""The t-tuples of a model in one flat numbering, the lower bound, and the coverage verifier."""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from array import array
from collections.abc import Sequence
from typing import cast

from taskexec.plan.covering.constraints import Constraints, Row


def lower_bound(sizes: Sequence[int], t: int = 2) -> int:
    """The fewest rows any suite of strength ``t`` can have: the product of the t largest sizes."""
    return math.prod(sorted(sizes, reverse=True)[:t])


class Tuples:
    """The t-tuples of a model, numbered in one flat range.

    The tuple of columns ``cols`` (ascending, the ``s``-th such combination) and values
    ``vals`` is number ``base[s] + sum(vals[x] * muls[s][x])``: a count per tuple then fits
    a flat list, several times smaller and faster than a dict of tuples at a million.
    """

    def __init__(self, sizes: Sequence[int], t: int) -> None:
        self.sizes, self.t, k = list(sizes), t, len(sizes)
        self.sets = list(itertools.combinations(range(k), t))
        self.base: list[int] = []
        self.muls: list[list[int]] = []
        total = 0
        for cols in self.sets:
            self.base.append(total)
            mul, m = [], 1
            for c in reversed(cols):
                mul.append(m)
                m *= sizes[c]
            mul.reverse()
            self.muls.append(mul)
            total += m
        self.total = total
        # For each column: the combinations holding it and its multiplier in each, the
        # arithmetic a change of that column's value needs.
        self.of_col: list[list[int]] = [[] for _ in range(k)]
        self.mul_of_col: list[list[int]] = [[] for _ in range(k)]
        for s, cols in enumerate(self.sets):
            for x, c in enumerate(cols):
                self.of_col[c].append(s)
                self.mul_of_col[c].append(self.muls[s][x])
        self.set_index = {cols: s for s, cols in enumerate(self.sets)} if t > 2 else {}
        # Pairs: shift[i][a], the numbers of the pairs (i=a, j=0) for every j > i, so that a
        # row's pairs are one C-level map per column (five times faster than a generator).
        self.shift: list[list[list[int]]] = []
        if t == 2:
            s = 0
            for i in range(k - 1):
                bases = self.base[s : s + k - 1 - i]
                self.shift.append(
                    [
                        [b + a * sizes[j] for b, j in zip(bases, range(i + 1, k), strict=True)]
                        for a in range(sizes[i])
                    ]
                )
                s += k - 1 - i

    def index(self, row: Sequence[int]) -> array[int]:
        """The numbers of the tuples a complete row holds, one per combination of columns."""
        if self.t == 2:
            out = array("q")
            for i, shift in enumerate(self.shift):
                out.extend(map(operator.add, shift[row[i]], row[i + 1 :]))
            return out
        return array(
            "q",
            (
                b + sum(row[c] * m for c, m in zip(cols, mul, strict=True))
                for b, cols, mul in zip(self.base, self.sets, self.muls, strict=True)
            ),
        )

    def decode(self, i: int) -> tuple[tuple[int, ...], list[int]]:
        """The columns and values of tuple number ``i``."""
        s = bisect.bisect_right(self.base, i) - 1
        code = i - self.base[s]
        cols = self.sets[s]
        return cols, [code // m % self.sizes[c] for c, m in zip(cols, self.muls[s], strict=True)]

    def gains(self, pos: int, row: Sequence[int | None], flags: bytearray) -> list[int]:
        """For each value of ``pos``: the flagged tuples it forms with the set cells of ``row``."""
        size = self.sizes[pos]
        if self.t == 2:
            # The flags of one set column's partners are a byte slice; read as one big
            # integer and summed, the slices add up in every byte lane at once. A lane holds
            # at most 199 (the other parameters), so it never carries into the next.
            total, sizes, n = 0, self.sizes, len(row)
            for j, b in enumerate(row):
                if b is None or j == pos:
                    continue
                if j < pos:
                    lo = self.base[j * (2 * n - j - 1) // 2 + pos - j - 1] + b * size
                    total += int.from_bytes(flags[lo : lo + size], "little")
                else:
                    lo = self.base[pos * (2 * n - pos - 1) // 2 + j - pos - 1] + b
                    total += int.from_bytes(flags[lo : lo + size * sizes[j] : sizes[j]], "little")
            return list(total.to_bytes(size, "little"))
        out = [0] * size
        set_cols = [c for c, v in enumerate(row) if v is not None and c != pos]
        for others in itertools.combinations(set_cols, self.t - 1):
            cols = tuple(sorted((*others, pos)))
            s = self.set_index[cols]
            at, mul = self.base[s], self.muls[s]
            step = 0
            for c, m in zip(cols, mul, strict=True):
                if c == pos:
                    step = m
                else:
                    at += cast(int, row[c]) * m
            for v in range(size):
                out[v] += flags[at + v * step]
        return out


def verify(tuples: Tuples, cons: Constraints, rows: Sequence[Row]) -> tuple[int, int]:
    """Recount the tuples of ``rows`` from scratch and prove every missing one unreachable.

    Independent of :class:`Suite`'s incremental counts, so a bug in the search cannot hide.

    Returns:
        The reachable tuples and the tuples the rows hold.

    Raises:
        AssertionError: A row is excluded, or a reachable tuple is missing.
    """
    seen = bytearray(tuples.total)
    for row in rows:
        if not cons.allowed(row):
            raise AssertionError(f"an excluded case in the suite: {row}: a bug in taskexec.plan.covering")
        for i in tuples.index(row):
            seen[i] = 1
    held = seen.count(1)
    missing, k = 0, 0
    while (k := seen.find(0, k)) >= 0:
        cols, vals = tuples.decode(k)
        partial: list[int | None] = [None] * len(tuples.sizes)
        for c, v in zip(cols, vals, strict=True):
            partial[c] = v
        if cons.completable(partial):
            raise AssertionError(
                f"tuple {cols}={vals} is reachable but not covered: a bug in taskexec.plan.covering"
            )
        missing += 1
        k += 1
    return tuples.total - missing, held
