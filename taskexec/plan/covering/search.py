"""Post-optimisation: delete a row, repair the tuples only it held by a tabu search, repeat."""

from __future__ import annotations

import random
from collections import deque

from taskexec.plan.covering.constraints import Row
from taskexec.plan.covering.suite import Suite


def shrink(
    suite: Suite,
    budget: int,
    attempt: int,
    floor: int,
    rng: random.Random,
    tenure: int = 5,
    targets: int = 1,
    spread: bool = False,
) -> list[Row]:
    """Delete rows and repair their tuples while ``budget`` lasts; the smallest complete suite.

    The budget counts work, not time: units of about 1/8 µs here, counted from the
    tuples a step's change touches and the changes it scores. A deletion whose repair spends ``attempt``
    is given up: the last complete suite comes back and the next weakest row goes
    instead (one repair stalls where another goes through), until every row was tried.
    The search also stops at ``floor``, the lower bound. A changed cell is not changed
    again for ``tenure`` steps, unless that reaches a state better than any since the
    deletion: 5 did better than 1-3, 10, 20 or a share of the rows.

    ``targets``: the uncovered tuples a step weighs the moves of (a sample, the best move
    over all of them is made): 5 instead of 1, with attempts four times as long, took
    10^20 from 187 to 184 and 6^20 from 68 to 67 (with three other seeds: 67, 67, 68),
    where the repair had stalled two to six tuples short. ``spread``: ties between
    the weakest rows to delete are broken at random, not by position, so that the attempts
    after a failed one start from other rows.
    """
    suite.open()
    if suite.uncovered:
        raise AssertionError("shrink() needs a complete suite")
    best = suite.save()
    work, mark, low = 0, 0, 0
    degree = len(suite.tuples.of_col[0]) + 1
    tabu: deque[tuple[int, int]] = deque(maxlen=tenure)  # the cells changed last, (row, column)
    tried: set[Row] = set()  # rows deleted in vain from the current best suite
    # Per column, the rows a required case fixes it in: always the first rows, as the
    # deletions take the last row into a deleted row's place and never delete these.
    fixed = [
        sum(1 << r for r, lock in enumerate(suite.locked) if c in lock)
        for c in range(len(suite.tuples.sizes))
    ]
    while True:
        if not suite.uncovered:
            best = suite.save()
            suite.history.append((work, len(suite.rows)))
            tried.clear()
            if len(suite.rows) <= floor or not _delete(suite, tried, rng if spread else None):
                break
        elif work >= budget:
            break
        elif work - mark >= attempt:
            suite.load(best)
            if not _delete(suite, tried, rng if spread else None):
                break
        else:
            scored = _step(suite, rng, tabu, low, fixed, targets)
            # About 8 units a µs here (within a factor of 2 on 2^100, 3^100, 10^20 and
            # 4^1 3^39 2^35): a change touches every tuple of its cell, which dominates on
            # wide models; a pair's change is scored in one step, a tuple's in one map.
            work += 20 * degree + 8 * scored + 100 if suite.pairs else degree * (8 + 2 * scored)
            low = min(low, len(suite.uncovered))
            continue
        tabu.clear()
        mark, low = work, len(suite.uncovered)
    return [tuple(r) for r in best[0]]


def _delete(suite: Suite, tried: set[Row], rng: random.Random | None = None) -> bool:
    """Delete the row, not yet tried, holding the fewest tuples alone (the first such, or with
    ``rng`` one such at random)."""
    found = [
        (suite.unique(r), r)
        for r in range(len(suite.rows))
        if not suite.locked[r] and tuple(suite.rows[r]) not in tried
    ]
    if not found:
        return False
    if rng is None:
        r = min(found)[1]
    else:
        fewest = min(found)[0]
        ties = [r for n, r in found if n == fewest]
        r = ties[rng.randrange(len(ties))]
    tried.add(tuple(suite.rows[r]))
    suite.remove(r)
    return True


def _step(
    suite: Suite,
    rng: random.Random,
    tabu: deque[tuple[int, int]],
    low: int,
    fixed: list[int],
    targets: int = 1,
) -> int:
    """One tabu step towards uncovered tuples (``targets`` of them); returns the changes it scored."""
    unc = suite.uncovered
    if targets == 1 or len(unc) == 1:
        aims = [unc[rng.randrange(len(unc))]]
    else:
        aims = rng.sample(unc, min(targets, len(unc)))
    every = (1 << len(suite.rows)) - 1
    best, picks, scored = -(1 << 30), [], 0
    left = len(unc)
    rows, masks, rules, pairs = suite.rows, suite.mask, suite.cons.rules, suite.pairs
    allows, holding = suite.cons.allows, suite.holding
    blocked: dict[int, int] = {}  # column -> its tabu rows, as bits
    for r, c in tabu:
        blocked[c] = blocked.get(c, 0) | 1 << r
    for target in aims:
        cols, vals = suite.tuples.decode(target)
        for x, c in enumerate(cols):
            near = every & ~fixed[c]
            for y, d in enumerate(cols):
                if y != x:
                    near &= holding[d][vals[y]]
            v = vals[x]
            held = blocked.get(c, 0)
            if pairs:  # delta(), inlined: the search spends most of its time here
                zero, single = suite.zero[c][v], suite.single[c]
            while near:
                bit = near & -near
                near ^= bit
                r = bit.bit_length() - 1
                row = rows[r]
                if rules and not allows(row, c, v):
                    continue
                if pairs:
                    mask = masks[r]
                    gain = (zero & mask).bit_count() - (single[row[c]] & mask).bit_count()
                else:
                    gain = suite.delta(r, c, v)
                scored += 1
                if held & bit and left - gain >= low:
                    continue  # tabu, and no better than the best state since the deletion
                if gain > best:
                    best, picks = gain, [(r, c, v)]
                elif gain == best:
                    picks.append((r, c, v))
    if picks:
        r, c, v = picks[rng.randrange(len(picks))] if len(picks) > 1 else picks[0]
        tabu.append((r, c))
        suite.change(r, c, v)
    else:
        scored += _force(suite, rng, cols, vals)
    return scored


def _force(suite: Suite, rng: random.Random, cols: tuple[int, ...], vals: list[int]) -> int:
    """No row misses the tuple by one free cell: set all its cells in a row that can take them."""
    fits = []
    for r, row in enumerate(suite.rows):
        if any(c in suite.locked[r] for c in cols):
            continue
        new = list(row)
        for c, v in zip(cols, vals, strict=True):
            new[c] = v
        if suite.cons.allowed(new):
            fits.append(r)
    if not fits:
        return 0
    r = fits[rng.randrange(len(fits))]
    for c, v in zip(cols, vals, strict=True):
        if suite.rows[r][c] != v:
            suite.change(r, c, v)
    return len(cols)
