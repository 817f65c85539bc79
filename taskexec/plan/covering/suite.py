"""A suite under change: rows, the count of rows holding each tuple, and the greedy builder."""

from __future__ import annotations

import operator
import random
from array import array
from collections.abc import Callable, Sequence
from typing import Any, cast

from taskexec.plan.covering.constraints import Constraints, Row
from taskexec.plan.covering.tuples import Tuples


class Suite:
    """Rows under change and the count of rows holding each tuple.

    Attributes:
        rows: The rows, as lists.
        locked: Per row, the columns a required case fixes; a row with any is never deleted.
        need: 1 for every tuple some allowed row can hold.
        uncovered: The needed tuples no row holds, in no particular order.
    """

    def __init__(self, tuples: Tuples, cons: Constraints) -> None:
        self.tuples, self.cons = tuples, cons
        self.rows: list[list[int]] = []
        self.tix: list[array[int]] = []  # per row, its tuples: tuples.index(row)
        self.locked: list[frozenset[int]] = []
        self.count = [0] * tuples.total
        self.need = bytearray(b"\x01") * tuples.total
        self.unc = bytearray(b"\x01") * tuples.total  # count == 0 and needed
        self.one = bytearray(tuples.total)  # count == 1
        self.uncovered: list[int] = []  # filled by open(); kept in sync by change()
        self._where: dict[int, int] = {}
        # holding[c][v]: a bit per row whose column c is v, to find near misses fast.
        self.holding = [[0] * s for s in tuples.sizes]
        self._getters = [_getter(ts) for ts in tuples.of_col]
        self.history: list[tuple[int, int]] = []  # shrink(): (work spent, rows) at each suite kept
        # Pairs: the flags again as bit masks per value, the bit of (j, w) at offset[j] + w:
        # zero[c][v] for the needed pairs (c=v, j=w) no row holds, single[c][v] for those one
        # row holds. With each row's mask of its own values, a change is scored by two ANDs
        # and popcounts, four times faster than summing flags over the other columns.
        self.pairs = tuples.t == 2
        sizes = tuples.sizes
        self.offset = [sum(sizes[:c]) for c in range(len(sizes))]
        # partner[c]: for each pair of columns holding c (as in tuples.of_col), the other one.
        self.partner = [[sum(tuples.sets[x]) - c for x in of] for c, of in enumerate(tuples.of_col)]
        every = (1 << sum(sizes)) - 1
        self.zero = [[every & ~(((1 << n) - 1) << self.offset[c])] * n for c, n in enumerate(sizes)]
        self.single = [[0] * n for n in sizes]
        self.mask: list[int] = []  # per row, the bits of its values

    def add(self, row: Sequence[int], locked: frozenset[int] = frozenset()) -> None:
        """Add a row; ``locked``: the columns a required case fixes in it."""
        r = len(self.rows)
        self.rows.append(list(row))
        self.locked.append(locked)
        tix = self.tuples.index(row)
        self.tix.append(tix)
        for c, v in enumerate(row):
            self.holding[c][v] |= 1 << r
        if self.pairs:
            self.mask.append(sum(1 << (self.offset[c] + v) for c, v in enumerate(row)))
            self._tally_pairs(row, tix, up=True)
        else:
            for i in tix:
                self._more(i)

    def remove(self, r: int) -> None:
        """Delete row ``r``; the last row takes its place."""
        row = self.rows[r]
        if self.pairs:
            self._tally_pairs(row, self.tix[r], up=False)
        else:
            for i in self.tix[r]:
                self._less(i)
        last = len(self.rows) - 1
        for c, v in enumerate(self.rows[r]):
            self.holding[c][v] &= ~(1 << r)
        if r != last:
            for c, v in enumerate(self.rows[last]):
                self.holding[c][v] ^= (1 << last) | (1 << r)
            self.rows[r], self.tix[r], self.locked[r] = self.rows[last], self.tix[last], self.locked[last]
            if self.pairs:
                self.mask[r] = self.mask[last]
        del self.rows[-1], self.tix[-1], self.locked[-1]
        if self.pairs:
            del self.mask[-1]

    def _tally_pairs(self, row: Sequence[int], tix: array[int], up: bool) -> None:
        """add() or remove() at strength 2: counts, flags and masks, inline for speed."""
        count, one, unc, need, zero, single = (
            self.count,
            self.one,
            self.unc,
            self.need,
            self.zero,
            self.single,
        )
        bits = [1 << (o + v) for o, v in zip(self.offset, row, strict=True)]
        for (c, j), i in zip(self.tuples.sets, tix, strict=True):
            n = count[i] = count[i] + (1 if up else -1)
            if n > 2:
                continue
            a, b = row[c], row[j]
            if up and n == 1:
                one[i] = 1
                single[c][a] |= bits[j]
                single[j][b] |= bits[c]
                if unc[i]:
                    unc[i] = 0
                    self._drop(i)
                    zero[c][a] &= ~bits[j]
                    zero[j][b] &= ~bits[c]
            elif n == 1 or (up and n == 2):
                one[i] = n == 1
                single[c][a] ^= bits[j]
                single[j][b] ^= bits[c]
            elif n == 0:
                one[i] = 0
                single[c][a] &= ~bits[j]
                single[j][b] &= ~bits[c]
                if need[i]:
                    unc[i] = 1
                    self._push(i)
                    zero[c][a] |= bits[j]
                    zero[j][b] |= bits[c]

    def open(self) -> None:
        """List the needed tuples no row holds (after rows were added to a fresh suite)."""
        self.uncovered = []
        self._where = {}
        k = 0
        while (k := self.unc.find(1, k)) >= 0:  # C-speed scan to the next one
            self._push(k)
            k += 1

    def forget(self, i: int) -> None:
        """Mark tuple ``i`` unreachable: no longer needed."""
        self.need[i] = 0
        if self.pairs:
            self._flip(self.zero, i, False)
        if self.unc[i]:
            self.unc[i] = 0
            self._drop(i)

    def _flip(self, masks: list[list[int]], i: int, on: bool) -> None:
        """Set or clear pair ``i``'s bits in ``masks``, on both of its values."""
        (c, j), (a, b) = self.tuples.decode(i)
        bj, bc = 1 << (self.offset[j] + b), 1 << (self.offset[c] + a)
        if on:
            masks[c][a] |= bj
            masks[j][b] |= bc
        else:
            masks[c][a] &= ~bj
            masks[j][b] &= ~bc

    def _more(self, i: int) -> None:
        """One more row holds tuple ``i`` (strength 3 and 4; pairs have _tally_pairs)."""
        n = self.count[i] = self.count[i] + 1
        if n == 1:
            self.one[i] = 1
            if self.unc[i]:
                self.unc[i] = 0
                self._drop(i)
        elif n == 2:
            self.one[i] = 0

    def _less(self, i: int) -> None:
        """One row fewer holds tuple ``i``."""
        n = self.count[i] = self.count[i] - 1
        if n == 0:
            self.one[i] = 0
            if self.need[i]:
                self.unc[i] = 1
                self._push(i)
        elif n == 1:
            self.one[i] = 1

    def _push(self, i: int) -> None:
        self._where[i] = len(self.uncovered)
        self.uncovered.append(i)

    def _drop(self, i: int) -> None:
        at = self._where.pop(i, None)
        if at is None:  # before open(): nothing listed yet
            return
        last = self.uncovered.pop()
        if last != i:
            self.uncovered[at] = last
            self._where[last] = at

    def build(self, fixed: Sequence[int | None], rng: random.Random, tries: int = 1) -> Row | None:
        """An allowed row extending ``fixed`` that covers many uncovered tuples, or None if none is.

        Greedy in the manner of AETG: the free columns in a random order, each given the value
        that covers the most uncovered tuples with the columns set before it (ties at random:
        always taking the first value made 67 cases of 2^100, against 16); the best of
        ``tries`` such rows.
        """
        if not self.cons.completable(fixed):
            return None
        free = [c for c, v in enumerate(fixed) if v is None]
        best, most = None, -1
        for _ in range(tries):
            order = list(free)
            rng.shuffle(order)
            row = list(fixed)

            def rank(pos: int, row: list[int | None] = row) -> list[int]:
                gains = self.tuples.gains(pos, row, self.unc)
                values = list(range(len(gains)))
                rng.shuffle(values)
                values.sort(key=lambda v: -gains[v])
                return values

            found = self.cons.rows(row, order, rank)
            try:
                made = next(found)
            finally:
                found.close()
            if tries == 1:
                return made
            covers = sum(map(self.unc.__getitem__, self.tuples.index(made)))
            if covers > most:
                best, most = made, covers
        return best

    def complete(self, rng: random.Random, limit: int, tries: int = 1) -> int:
        """Add rows until every reachable tuple is covered; mark the others unreachable.

        Returns:
            The rows added.

        Raises:
            ValueError: The suite would exceed ``limit`` rows.
        """
        added = target = 0
        # The flags, not the list of uncovered tuples: filling that list with every tuple of
        # an empty suite and emptying it again took a tenth of 3^100's time.
        while (target := self.unc.find(1, target)) >= 0:
            cols, vals = self.tuples.decode(target)
            fixed: list[int | None] = [None] * len(self.tuples.sizes)
            for c, v in zip(cols, vals, strict=True):
                fixed[c] = v
            row = self.build(fixed, rng, tries)
            if row is None:
                self.forget(target)
                continue
            self.add(row)
            added += 1
            if len(self.rows) > limit:
                raise ValueError(f"the suite needs more than {limit} cases, the limit")
        return added

    def unique(self, r: int) -> int:
        """The tuples only row ``r`` holds."""
        return sum(map(self.one.__getitem__, self.tix[r]))

    def delta(self, r: int, c: int, v: int) -> int:
        """Tuples covered minus tuples uncovered by setting cell (r, c) to ``v``."""
        if self.pairs:
            mask = self.mask[r]
            return (self.zero[c][v] & mask).bit_count() - (self.single[c][self.rows[r][c]] & mask).bit_count()
        idx = self._getters[c](self.tix[r])
        step = v - self.rows[r][c]
        moved = map(operator.add, idx, map(step.__mul__, self.tuples.mul_of_col[c]))
        return sum(map(self.unc.__getitem__, moved)) - sum(map(self.one.__getitem__, idx))

    def change(self, r: int, c: int, v: int) -> None:
        """Set cell (r, c) to ``v``, keeping counts, flags and the uncovered list in step."""
        row, tix = self.rows[r], self.tix[r]
        old = row[c]
        if old == v:
            return
        if self.pairs:
            self._change_pairs(r, c, v)
            return
        step = v - old
        count, one, unc, need = self.count, self.one, self.unc, self.need
        for s, m in zip(self.tuples.of_col[c], self.tuples.mul_of_col[c], strict=True):
            i = tix[s]
            j = tix[s] = i + step * m
            n = count[i] = count[i] - 1
            if n == 0:
                one[i] = 0
                if need[i]:
                    unc[i] = 1
                    self._push(i)
            elif n == 1:
                one[i] = 1
            n = count[j] = count[j] + 1
            if n == 1:
                one[j] = 1
                if unc[j]:
                    unc[j] = 0
                    self._drop(j)
            elif n == 2:
                one[j] = 0
        row[c] = v
        self.holding[c][old] &= ~(1 << r)
        self.holding[c][v] |= 1 << r

    def _change_pairs(self, r: int, c: int, v: int) -> None:
        """change() at strength 2: the same counts and flags, and the masks."""
        row, tix, offset = self.rows[r], self.tix[r], self.offset
        old = row[c]
        step = v - old
        count, one, unc, need, zero, single = (
            self.count,
            self.one,
            self.unc,
            self.need,
            self.zero,
            self.single,
        )
        bc_old, bc_new = 1 << (offset[c] + old), 1 << (offset[c] + v)
        z_old, z_new, s_old, s_new = zero[c][old], zero[c][v], single[c][old], single[c][v]
        for s, m, j in zip(self.tuples.of_col[c], self.tuples.mul_of_col[c], self.partner[c], strict=True):
            w = row[j]
            bj = 1 << (offset[j] + w)
            i = tix[s]
            k = tix[s] = i + step * m
            n = count[i] = count[i] - 1
            if n == 0:
                one[i] = 0
                s_old &= ~bj
                single[j][w] &= ~bc_old
                if need[i]:
                    unc[i] = 1
                    self._push(i)
                    z_old |= bj
                    zero[j][w] |= bc_old
            elif n == 1:
                one[i] = 1
                s_old |= bj
                single[j][w] |= bc_old
            n = count[k] = count[k] + 1
            if n == 1:
                one[k] = 1
                s_new |= bj
                single[j][w] |= bc_new
                if unc[k]:
                    unc[k] = 0
                    self._drop(k)
                    z_new &= ~bj
                    zero[j][w] &= ~bc_new
            elif n == 2:
                one[k] = 0
                s_new &= ~bj
                single[j][w] &= ~bc_new
        zero[c][old], zero[c][v], single[c][old], single[c][v] = z_old, z_new, s_old, s_new
        self.mask[r] ^= bc_old | bc_new
        row[c] = v
        self.holding[c][old] &= ~(1 << r)
        self.holding[c][v] |= 1 << r

    def save(self) -> tuple[Any, ...]:
        """A copy of a complete suite's state, to come back to: faster than rebuilding it."""
        arrays = (self.count, self.one, self.unc, self.holding, self.zero, self.single, self.mask)
        return _copied((self.rows, self.tix, self.locked, *arrays))

    def load(self, state: tuple[Any, ...]) -> None:
        """Come back to a state save() made (which stays as it was, for another time)."""
        fresh = _copied(state)
        self.rows, self.tix, self.locked, self.count, self.one, self.unc = fresh[:6]
        self.holding, self.zero, self.single, self.mask = fresh[6:]
        self.uncovered, self._where = [], {}


def _copied(state: tuple[Any, ...]) -> tuple[Any, ...]:
    rows, tix, locked, count, one, unc, holding, zero, single, mask = state
    return (
        [list(r) for r in rows],
        [array("q", t) for t in tix],
        list(locked),
        list(count),
        bytearray(one),
        bytearray(unc),
        [list(h) for h in holding],
        [list(z) for z in zero],
        [list(z) for z in single],
        list(mask),
    )


def _getter(items: list[int]) -> Callable[[Sequence[int]], tuple[int, ...]]:
    """``operator.itemgetter`` that returns a tuple even for one item."""
    if len(items) == 1:
        (only,) = items
        return lambda seq: (seq[only],)
    return cast(Callable[[Sequence[int]], tuple[int, ...]], operator.itemgetter(*items))
