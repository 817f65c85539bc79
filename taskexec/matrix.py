"""Parameter matrices: one plan task expanded into cases (pairwise, cartesian, scenario_only).

* ``cartesian``: every combination, in declaration order, minus exclusions, at most
  ``max_cases``.
* ``pairwise``: every reachable pair of values of every two parameters appears in some case,
  for any number of parameters. The cases come from :mod:`allpairspy` (run on value indexes,
  so any JSON value works, on two parameter orders, keeping the smaller suite, within a
  work budget); then every pair is checked and the ones allpairspy missed (it misses some
  under constraints, and stops at its budget on huge models) get cases built greedily;
  cases whose every pair another case covers are dropped. ``max_cases`` keeps the cases
  that cover the most pairs, and the expansion says how many the full suite needs.
* ``scenario_only``: a single case, the first value of every parameter (the first
  combination, in declaration order, that no exclusion removes).

``exclude`` lists partial assignments that no case may contain. A pair is *reachable* when
some case holding it escapes every exclusion; a search over the parameters that exclusions
name, with forward checking, decides it.

Generation is deterministic: the same spec gives the same cases, in the same order. Every
budget below counts steps, never seconds, so that a plan compiles alike on every machine.

Example:
    >>> spec = MatrixSpec(strategy="pairwise", params={"a": [1, 2, 3], "b": [1, 2, 3], "c": [1, 2, 3]})
    >>> len(expand(spec).cases)
    9
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import operator
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from allpairspy import AllPairs, pairs_storage
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["MAX_CASES", "MAX_PAIRS", "Expansion", "MatrixSpec", "expand", "lower_bound"]

#: The most cases one matrix may expand to; beyond it a plan must set ``max_cases``.
MAX_CASES = 100_000
#: The most value pairs (pairs of values of two parameters) a pairwise matrix may have.
#: With MAX_CASES it bounds the time a compile spends on one matrix: 4 s for 7^200 (975,100
#: pairs, 198 cases) or 300^3 (91,019 cases), 2.4 s for 2^200, 0.9 s for 2^100 here.
MAX_PAIRS = 1_000_000
#: allpairspy's share of the work, in units of about 1/6 µs here (2 s): 2^100 (5.4 M),
#: 4^15 3^17 2^29 or 10^20 fit whole; beyond it allpairspy's cost per case, cubic in the
#: number of parameters (7^200 would take minutes), is cut and the greedy builder finishes.
_ALLPAIRS_BUDGET = 12_000_000
#: Exclusion checks the completability search may make in one expansion (a few seconds):
#: partial assignments can encode any satisfiability problem, so some cap is needed.
_SEARCH_BUDGET = 10_000_000

Row = tuple[int, ...]  # one case as value indexes, in declaration order


class MatrixSpec(BaseModel):
    """The ``matrix`` of a plan task."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["pairwise", "cartesian", "scenario_only"] = "pairwise"
    # At most 200 parameters: _Coverage.gains counts in byte lanes, which hold up to 255.
    params: dict[str, Annotated[list[Any], Field(min_length=1, max_length=10_000)]] = Field(
        min_length=1, max_length=200
    )
    exclude: list[dict[str, Any]] = Field(
        default_factory=list, description="partial assignments that no case may contain"
    )
    max_cases: int | None = Field(None, ge=1, le=MAX_CASES)

    @model_validator(mode="after")
    def _exclusions_name_values(self) -> MatrixSpec:
        keys = {name: {_key(v) for v in values} for name, values in self.params.items()}
        for k, entry in enumerate(self.exclude):
            if not entry:
                raise ValueError(f"exclude[{k}] is empty: it would exclude every case")
            for name, value in entry.items():
                if name not in keys:
                    raise ValueError(f"exclude[{k}] names {name!r}, which is not a matrix parameter")
                # An entry with a value the matrix lacks would silently exclude nothing: it is
                # almost always a typo (or 0.0 for 0), so it is an error, not a no-op.
                if _key(value) not in keys[name]:
                    raise ValueError(f"exclude[{k}].{name}: {value!r} is not a value of {name!r}")
        return self


@dataclass(frozen=True)
class Expansion:
    """The cases of one matrix and how they cover it.

    Attributes:
        cases: The cases, each a dict of parameter name to value.
        cartesian: The size of the full cartesian product (before exclusions).
        pairs_total: Pairwise only: the reachable value pairs (one parameter: values).
        pairs_covered: Pairwise only: the pairs the kept cases cover.
        truncated: Whether ``max_cases`` cut the cases.
        cases_needed: Pairwise only: the cases of the full-coverage suite, which is more
            than ``len(cases)`` when ``truncated``.
    """

    cases: list[dict[str, Any]]
    cartesian: int
    pairs_total: int = 0
    pairs_covered: int = 0
    truncated: bool = False
    cases_needed: int = 0


def _key(value: Any) -> str:
    # Values compare by their JSON form: 1, 1.0 and true are different parameter values.
    # repr() stands in for what JSON cannot encode (a YAML date), rather than failing.
    return json.dumps(value, sort_keys=True, default=repr)


class _Space:
    """The matrix as value indexes, with exclusions compiled to index constraints.

    Only parameters that some exclusion names can keep a partial row from becoming a case,
    so :meth:`completable` searches over those alone, and remembers its answers: the search
    that fills a row then never backtracks past one value, whatever sits in between.
    """

    def __init__(self, spec: MatrixSpec) -> None:
        self.names = list(spec.params)
        self.values = [spec.params[n] for n in self.names]
        self.sizes = [len(v) for v in self.values]
        keys = [[_key(v) for v in vals] for vals in self.values]
        # rule: {param index: the value indexes it matches}; a case matching every key is excluded.
        self.rules: list[dict[int, frozenset[int]]] = []
        for entry in spec.exclude:
            rule = {}
            for name, value in entry.items():
                i = self.names.index(name)
                rule[i] = frozenset(k for k, key in enumerate(keys[i]) if key == _key(value))
            self.rules.append(rule)
        self.constrained = sorted({i for rule in self.rules for i in rule})
        self.is_constrained = [i in self.constrained for i in range(len(self.names))]
        self._memo: dict[tuple[int | None, ...], bool] = {}
        self._work_left = _SEARCH_BUDGET

    def allowed(self, row: Sequence[int]) -> bool:
        """Whether no exclusion matches a complete row."""
        return not any(all(row[i] in vs for i, vs in rule.items()) for rule in self.rules)

    def viable(self, row: Sequence[int | None]) -> bool:
        """Whether a partial row matches no exclusion and leaves every free parameter a value.

        The second half is forward checking: an exclusion whose other keys all match bans
        its values of the one free key, and a parameter left with no value dooms the row.
        """
        banned: dict[int, set[int]] = {}
        for rule in self.rules:
            free = -1
            for i, vs in rule.items():
                v = row[i]
                if v is None:
                    if free >= 0:
                        break
                    free = i
                elif v not in vs:
                    break
            else:
                if free < 0:
                    return False
                ban = banned.setdefault(free, set())
                ban |= rule[free]
                if len(ban) == self.sizes[free]:
                    return False
        return True

    def completable(self, row: Sequence[int | None]) -> bool:
        """Whether some case (a complete row no exclusion matches) extends a partial row.

        Raises:
            ValueError: The search spent its budget: partial assignments can encode any
                satisfiability problem, so the answer may take exponential time.
        """
        if not self.rules:
            return True
        key = tuple(row[i] for i in self.constrained)
        found = self._memo.get(key)
        if found is None:
            free = [i for i in self.constrained if row[i] is None]
            found = self._memo[key] = self._extend(list(row), free, 0)
        return found

    def _extend(self, row: list[int | None], free: list[int], depth: int) -> bool:
        self._work_left -= len(self.rules)
        if self._work_left < 0:
            raise ValueError("the exclusions are too intricate to search for cases")
        if not self.viable(row):
            return False
        if depth == len(free):
            return True
        i = free[depth]
        for v in range(self.sizes[i]):
            row[i] = v
            if self._extend(row, free, depth + 1):
                return True
        row[i] = None
        return False

    def rows(
        self,
        row: list[int | None],
        order: Sequence[int],
        rank: Callable[[int], Iterable[int]],
        depth: int = 0,
    ) -> Generator[Row, None, None]:
        """The cases extending ``row`` (completable), filling ``order`` in turn, values by ``rank``.

        Only values that keep the row completable are taken, so every step leads to a case.
        ``row`` is a work area: each position is reset when the generator moves on or closes.
        """
        if depth == len(order):
            yield cast(Row, tuple(row))  # every position is set by now
            return
        pos = order[depth]
        try:
            for v in rank(pos):
                row[pos] = v
                if not self.is_constrained[pos] or self.completable(row):
                    yield from self.rows(row, order, rank, depth + 1)
        finally:
            row[pos] = None

    def in_order(self, pos: int) -> range:
        """Values of ``pos`` in declaration order: the cartesian and scenario_only rank."""
        return range(self.sizes[pos])

    def case(self, row: Sequence[int]) -> dict[str, Any]:
        return {n: self.values[i][v] for i, (n, v) in enumerate(zip(self.names, row, strict=True))}

    @property
    def cartesian(self) -> int:
        return math.prod(self.sizes)


class _Coverage:
    """How many rows hold each value pair, in one flat list.

    The pair (i, a, j, b) with i < j sits at ``base[i][j] + a * sizes[j] + b``: a list of
    ints is several times smaller and faster than a set of tuples at a million pairs.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        n = len(sizes)
        self.base = [[0] * n for _ in range(n)]
        total = 0
        for i, j in itertools.combinations(range(n), 2):
            self.base[i][j] = total
            total += sizes[i] * sizes[j]
        self.count = [0] * total
        self.uncovered = bytearray(b"\x01") * total  # count == 0, as bytes for C-speed scans
        # deg[i][a]: uncovered pairs holding value a of parameter i. The greedy builder breaks
        # ties by it (AETG's rule): without it every tie went to value 0, and a 2^100 model
        # took 67 cases instead of 16.
        self.deg = [[sum(sizes) - s] * s for s in sizes]

    def indexes(self, row: Sequence[int]) -> list[int]:
        """The pairs of a row."""
        sizes, n = self.sizes, len(row)
        out: list[int] = []
        for i in range(n - 1):
            base, a = self.base[i], row[i]
            out.extend(base[j] + a * sizes[j] + row[j] for j in range(i + 1, n))
        return out

    def add(self, row: Sequence[int]) -> None:
        """Count a row's pairs."""
        count, sizes, deg, n = self.count, self.sizes, self.deg, len(row)
        for i in range(n - 1):
            base, a, di = self.base[i], row[i], deg[i]
            for j in range(i + 1, n):
                k = base[j] + a * sizes[j] + row[j]
                if not count[k]:
                    self.uncovered[k] = 0
                    di[a] -= 1
                    deg[j][row[j]] -= 1
                count[k] += 1

    def pair(self, k: int) -> tuple[int, int, int, int]:
        """The (i, a, j, b) at flat index ``k``; only for the rare pair that needs a case built."""
        for i, j in itertools.combinations(range(len(self.sizes)), 2):
            lo = self.base[i][j]
            if lo <= k < lo + self.sizes[i] * self.sizes[j]:
                a, b = divmod(k - lo, self.sizes[j])
                return i, a, j, b
        raise IndexError(k)

    def gains(self, pos: int, row: Sequence[int | None]) -> bytes:
        """For each value of ``pos``: the uncovered pairs it would form with the fixed values.

        The flags of one fixed parameter's partners are a byte slice; read as one big integer
        and summed, the slices add up in every byte lane at once. A lane holds at most 199
        (the other parameters), so it never carries into the next.
        """
        size, sizes, flags = self.sizes[pos], self.sizes, self.uncovered
        total = 0
        for j, b in enumerate(row):
            if b is None:
                continue
            if j < pos:
                lo = self.base[j][pos] + b * size
                total += int.from_bytes(flags[lo : lo + size], "little")
            else:
                lo = self.base[pos][j] + b
                total += int.from_bytes(flags[lo : lo + size * sizes[j] : sizes[j]], "little")
        return total.to_bytes(size, "little")


# allpairspy memoises every value combination it meets in a module-level dict
# (pairs_storage.key_cache) keyed by its per-call Item objects, so the dict only grows:
# megabytes per call in a long-lived producer. Entries are garbage once a call ends, so
# each call is followed by a clear. The lock keeps two of our calls (threads) from clearing
# under each other; a foreign caller of allpairspy in another thread could still lose a
# cache entry mid-lookup, which no public allpairspy API lets us avoid.
_ALLPAIRS_LOCK = threading.Lock()


class _OutOfBudget(Exception):
    """allpairspy spent its budget: keep the cases it built so far."""


def _allpairs(space: _Space, order: list[int], budget: int) -> tuple[list[Row], int, bool]:
    """allpairspy's suite with the parameters in ``order``, as rows in declaration order.

    Returns:
        The rows, the work spent and whether allpairspy finished within ``budget``.
    """
    sizes = [space.sizes[i] for i in order]
    n = len(order)
    spent = 0
    check_cost = 3 * sum(len(rule) for rule in space.rules)  # completable() below, in these units

    def viable(partial: list[int]) -> bool:
        nonlocal spent
        # allpairspy offers no hook, so its work is counted here. Choosing the k-th value
        # weighs every candidate against the k-1 chosen ones, then sorts them: a fit of its
        # run time over a dozen model shapes gives size * (k^2/2 + 1.6 k + 12 + 0.7 log2 size)
        # at about 6 million units per second, within 15%.
        k, s = len(partial), sizes[len(partial) - 1]
        spent += s * (k * k + 3 * k + 24 + s.bit_length()) // 2 + check_cost
        if spent > budget:
            raise _OutOfBudget
        if not space.rules:
            return True
        row: list[int | None] = [None] * n
        for pos, v in enumerate(partial):
            row[order[pos]] = v
        # Completability, not just "no exclusion matched yet": allpairspy backtracks one
        # parameter at a time, exponentially, out of a prefix that only looks viable.
        return space.completable(row)

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


def _pairwise(space: _Space) -> tuple[list[Row], _Coverage, int]:
    """A pairwise suite, its coverage, and the number of reachable pairs."""
    n = len(space.sizes)
    declared = list(range(n))
    rows, spent, complete = _allpairs(space, declared, _ALLPAIRS_BUDGET)
    # allpairspy is greedy in parameter order: largest domains first often gives a smaller
    # suite. Tried only when the first run left room for a second one as long.
    by_size = sorted(declared, key=lambda i: -space.sizes[i])
    if by_size != declared and complete and 2 * spent <= _ALLPAIRS_BUDGET:
        other, _, done = _allpairs(space, by_size, _ALLPAIRS_BUDGET - spent)
        if done and len(other) < len(rows):
            rows = other
    # allpairspy's last word is only checked on complete rows: drop any it got wrong.
    rows = [r for r in rows if space.allowed(r)]
    suite, cov, total, added = _complete(space, rows)
    if complete and added:
        # allpairspy missed pairs (exclusions): patching its suite often takes more cases
        # than building one greedily from scratch, which costs less than allpairspy did.
        alone = _complete(space, [])
        if len(alone[0]) < len(suite):
            suite, cov, total, _ = alone
    return suite, cov, total


def _complete(space: _Space, rows: list[Row]) -> tuple[list[Row], _Coverage, int, int]:
    """``rows`` plus cases for the reachable pairs they miss, minus redundant cases.

    Returns:
        The suite, its coverage, the number of reachable pairs and of cases added.
    """
    rows = list(rows)
    cov = _Coverage(space.sizes)
    for r in rows:
        cov.add(r)
    # Verify: every uncovered pair gets a case built for it, or is proven unreachable.
    count, total, k = cov.count, len(cov.count), 0
    unreachable, added = 0, 0
    while (k := cov.uncovered.find(1, k)) >= 0:  # C-speed scan to the next uncovered pair
        row = _build(space, cov, cov.pair(k))
        if row is None:
            unreachable += 1
            k += 1
            continue
        rows.append(row)
        cov.add(row)
        added += 1
        if len(rows) > MAX_CASES:  # stop early: the suite is refused anyway
            raise ValueError(f"the pairwise suite needs more than {MAX_CASES} cases, the limit")

    # Drop cases whose every pair some other case covers (latest first, so the suite keeps
    # allpairspy's early, dense cases and sheds the repair's overlap).
    kept: list[Row] = []
    for row in reversed(rows):
        idx = cov.indexes(row)
        if idx and all(count[i] > 1 for i in idx):
            for i in idx:
                count[i] -= 1
        else:
            kept.append(row)
    kept.reverse()
    return kept, cov, total - unreachable, added


def _build(space: _Space, cov: _Coverage, pair: tuple[int, int, int, int]) -> Row | None:
    """A case holding ``pair``, other values chosen to cover the most uncovered pairs.

    Returns None when no case can hold the pair: the exclusions make it unreachable.
    """
    i, a, j, b = pair
    row: list[int | None] = [None] * len(space.sizes)
    row[i], row[j] = a, b
    if not space.completable(row):
        return None
    top = sum(space.sizes)  # above any degree: gains first, degree breaks ties

    def rank(pos: int) -> Iterator[int]:
        gains = cov.gains(pos, row)
        score = list(map(operator.add, map(operator.mul, gains, itertools.repeat(top)), cov.deg[pos]))
        best = max(range(len(score)), key=score.__getitem__)
        yield best
        # Only an exclusion refusing ``best`` asks for more: sort the rest only then.
        yield from (v for v in sorted(range(len(score)), key=lambda v: -score[v]) if v != best)

    found = space.rows(row, [p for p in range(len(space.sizes)) if p not in (i, j)], rank)
    try:
        return next(found)
    finally:
        found.close()


def _most_covering(rows: list[Row], cov: _Coverage, limit: int) -> tuple[list[Row], int]:
    """The ``limit`` rows that cover the most pairs, picked greedily, and the pairs they cover.

    Coverage is submodular: a row's gain only falls as rows are picked, so a popped row whose
    fresh gain still tops the heap is the greedy choice without re-scoring the others.
    """
    seen = bytearray(len(cov.count))
    n = len(rows[0])
    heap = [(-n * (n - 1) // 2, r) for r in range(len(rows))]  # every row's gain bound
    picked: list[Row] = []
    covered = 0
    while heap and len(picked) < limit:
        _, r = heapq.heappop(heap)
        fresh = [i for i in cov.indexes(rows[r]) if not seen[i]]
        if heap and len(fresh) < -heap[0][0]:
            heapq.heappush(heap, (-len(fresh), r))
            continue
        for i in fresh:
            seen[i] = 1
        covered += len(fresh)
        picked.append(rows[r])
    return picked, covered


def lower_bound(sizes: Sequence[int]) -> int:
    """The fewest cases any pairwise suite can have: the product of the two largest sizes."""
    top = sorted(sizes, reverse=True)[:2]
    return math.prod(top)


def expand(spec: MatrixSpec) -> Expansion:
    """The cases of a matrix.

    Raises:
        ValueError: The matrix is above a limit, its exclusions remove every case, or they
            are too intricate to search.
    """
    space = _Space(spec)
    limit = spec.max_cases
    if not space.completable([None] * len(space.sizes)):
        raise ValueError("the exclusions remove every case")
    if spec.strategy in ("scenario_only", "cartesian"):
        cap = 1 if spec.strategy == "scenario_only" else (limit or MAX_CASES)
        if space.rules:
            found = space.rows([None] * len(space.sizes), range(len(space.sizes)), space.in_order)
            rows = list(itertools.islice(found, cap + 1))
            found.close()
        else:
            rows = list(itertools.islice(itertools.product(*map(range, space.sizes)), cap + 1))
        if not rows:
            raise ValueError("the exclusions remove every case")
        if spec.strategy == "scenario_only":
            return Expansion([space.case(rows[0])], space.cartesian)
        if len(rows) > cap and limit is None:
            raise ValueError(
                f"the cartesian product has {space.cartesian} cases, above the limit of {MAX_CASES}"
                f"{' (before exclusions)' if space.rules else ''}: set max_cases or use strategy pairwise"
            )
        truncated = len(rows) > cap
        return Expansion([space.case(r) for r in rows[:cap]], space.cartesian, truncated=truncated)

    sizes = space.sizes
    pairs = (sum(sizes) ** 2 - sum(k * k for k in sizes)) // 2
    if pairs > MAX_PAIRS:
        raise ValueError(f"the matrix has {pairs} value pairs, above the pairwise limit of {MAX_PAIRS}")
    if not space.rules and lower_bound(sizes) > MAX_CASES:
        raise ValueError(
            f"a pairwise suite of this matrix needs at least {lower_bound(sizes)} cases, "
            f"above the limit of {MAX_CASES}: use strategy cartesian with max_cases"
        )
    if len(sizes) == 1:  # no pairs: every value once
        rows = [(v,) for v in range(sizes[0]) if space.allowed((v,))]
        kept = rows[:limit] if limit else rows
        return Expansion(
            [space.case(r) for r in kept],
            space.cartesian,
            pairs_total=len(rows),
            pairs_covered=len(kept),
            truncated=len(kept) < len(rows),
            cases_needed=len(rows),
        )
    rows, cov, total = _pairwise(space)
    if not rows:
        raise ValueError("the exclusions remove every case")
    if len(rows) > (limit or MAX_CASES):
        if limit is None:
            raise ValueError(f"the pairwise suite has {len(rows)} cases, above the limit of {MAX_CASES}")
        kept, covered = _most_covering(rows, cov, limit)
    else:
        kept = rows
        covered = len(cov.count) - cov.count.count(0)
        if covered != total:  # the repair loop above covers every reachable pair by construction
            raise AssertionError(f"pairwise coverage {covered}/{total}: a bug in taskexec.matrix")
    return Expansion(
        [space.case(r) for r in kept],
        space.cartesian,
        pairs_total=total,
        pairs_covered=covered,
        truncated=len(kept) < len(rows),
        cases_needed=len(rows),
    )
