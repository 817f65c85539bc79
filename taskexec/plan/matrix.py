"""Parameter matrices: one plan task expanded into cases (pairwise, cartesian, scenario_only).

* ``cartesian``: every combination, in declaration order, minus exclusions, at most
  ``max_cases``.
* ``pairwise``: every reachable t-tuple of values (``strength`` t, 2 by default: pairs) of
  every t parameters appears in some case, for any number of parameters. At strength 2 the
  first draft comes from :mod:`allpairspy` (run on value indexes, so any JSON value works);
  at strength 3 and 4 (allpairspy's ``n=3`` suites miss a third to two thirds of the
  triples), and where allpairspy would spend more than its budget, from a greedy builder. Required cases
  (``include``) come first, completed by the builder; tuples the draft misses get cases
  built for them; then :mod:`taskexec.plan.covering` shrinks the suite by post-optimisation,
  for a budget of steps set by ``effort``, and recounts its coverage from scratch.
  ``max_cases`` keeps the required cases and then those that cover the most tuples, and
  the expansion says how many the full suite needs.
* ``scenario_only``: a single case, the first value of every parameter (the first
  combination, in declaration order, that no exclusion removes).

``exclude`` lists partial assignments that no case may contain. A tuple is *reachable* when
some case holding it escapes every exclusion; a search over the parameters that exclusions
name, with forward checking, decides it.

Generation is deterministic: the same spec gives the same cases, in the same order. Every
budget below counts steps, never seconds, so that a plan compiles alike on every machine.
A matrix whose draft would take more than about 5 s, or too much memory, is refused before
any work, with its sizes.

Example:
    >>> spec = MatrixSpec(strategy="pairwise", params={"a": [1, 2, 3], "b": [1, 2, 3], "c": [1, 2, 3]})
    >>> len(expand(spec).cases)
    9
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from taskexec.plan.covering import SEED, Constraints, Row, Rule, Suite, Tuples, lower_bound, shrink, verify
from taskexec.plan.draft import allpairs, draft_cost, most_covering, tuple_count

__all__ = [
    "MAX_CASES",
    "MAX_PAIRS",
    "MAX_TUPLES",
    "Effort",
    "Expansion",
    "MatrixSpec",
    "expand",
    "lower_bound",
]

#: The most cases one matrix may expand to; beyond it a plan must set ``max_cases``.
MAX_CASES = 100_000
#: The most value t-tuples (pairs at strength 2) a pairwise matrix may have: the counts of a
#: million tuples take 11 MB, and a change of one cell touches every tuple holding it.
MAX_TUPLES = 1_000_000
MAX_PAIRS = MAX_TUPLES  # its name before strength 3 and 4
#: The most a draft may cost, in seconds of this machine as :func:`draft_cost` estimates
#: them, and the memory the search may hold; above either, expand() refuses the matrix.
MAX_DRAFT_SECONDS = 5.0
MAX_MEMORY = 512 * 2**20
#: Exclusion checks the completability search may make in one expansion (a few seconds):
#: partial assignments can encode any satisfiability problem, so some cap is needed.
_SEARCH_BUDGET = 10_000_000

Effort = Literal["fast", "balanced", "thorough"]


@dataclass(frozen=True)
class _Effort:
    """What one effort level spends: units of work, never seconds (see taskexec.plan.covering.shrink).

    The post-optimiser's budget and its attempt at one deletion grow with the model's
    tuples, up to a cap: a small model reaches its best size in a few thousand steps and
    should not idle for the rest (a compile expands every matrix of a plan), a large one
    needs the cap.
    """

    allpairs: int  # allpairspy's budget, in its cost model's units (about 4.5 M a second here)
    shrink: tuple[int, int]  # the post-optimiser's budget: per tuple, cap (about 8 M a second here)
    attempt: tuple[int, int]  # its work on one deletion before it tries another row: per tuple, cap
    tries: int  # candidate rows the greedy builder weighs for each row
    targets: int = 1  # uncovered tuples a step of the post-optimiser weighs moves for
    spread: bool = False  # the post-optimiser breaks ties between rows to delete at random

    def budget(self, tuples: int) -> tuple[int, int]:
        """The post-optimiser's budget and attempt for a model of ``tuples`` tuples."""
        return min(self.shrink[0] * tuples, self.shrink[1]), min(self.attempt[0] * tuples, self.attempt[1])


_EFFORTS: dict[str, _Effort] = {
    "fast": _Effort(allpairs=2_000_000, shrink=(20, 500_000), attempt=(10, 200_000), tries=1),
    "balanced": _Effort(allpairs=6_000_000, shrink=(400, 4_000_000), attempt=(150, 1_500_000), tries=1),
    "thorough": _Effort(
        allpairs=12_000_000,
        shrink=(30_000, 200_000_000),
        attempt=(8_000, 48_000_000),
        tries=2,
        targets=5,
        spread=True,
    ),
}


class MatrixSpec(BaseModel):
    """The ``matrix`` of a plan task."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["pairwise", "cartesian", "scenario_only"] = "pairwise"
    # At most 200 parameters: Tuples.gains counts in byte lanes, which hold up to 255.
    params: dict[str, Annotated[list[Any], Field(min_length=1, max_length=10_000)]] = Field(
        min_length=1, max_length=200
    )
    exclude: list[dict[str, Any]] = Field(
        default_factory=list, description="partial assignments that no case may contain"
    )
    include: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=10_000,
        description="pairwise: cases the suite must contain, complete or partial (the rest is filled in)",
    )
    strength: int = Field(2, ge=2, le=4, description="pairwise: the t of the t-tuples every case set covers")
    effort: Effort = Field("balanced", description="pairwise: time traded for a smaller suite")
    max_cases: int | None = Field(None, ge=1, le=MAX_CASES)

    @model_validator(mode="after")
    def _entries_name_values(self) -> MatrixSpec:
        keys = {name: {_key(v) for v in values} for name, values in self.params.items()}
        for field in ("exclude", "include"):
            for k, entry in enumerate(getattr(self, field)):
                if not entry:
                    why = "it would exclude every case" if field == "exclude" else "it requires nothing"
                    raise ValueError(f"{field}[{k}] is empty: {why}")
                for name, value in entry.items():
                    if name not in keys:
                        raise ValueError(f"{field}[{k}] names {name!r}, which is not a matrix parameter")
                    # An entry with a value the matrix lacks would silently do nothing: it is
                    # almost always a typo (or 0.0 for 0), so it is an error, not a no-op.
                    if _key(value) not in keys[name]:
                        raise ValueError(f"{field}[{k}].{name}: {value!r} is not a value of {name!r}")
        if self.strategy != "pairwise":
            for field in ("include", "strength", "effort"):
                if field in self.model_fields_set:
                    raise ValueError(f"{field} applies to strategy pairwise only")
        return self


@dataclass(frozen=True)
class Expansion:
    """The cases of one matrix and how they cover it.

    Attributes:
        cases: The cases, each a dict of parameter name to value.
        cartesian: The size of the full cartesian product (before exclusions).
        pairs_total: Pairwise only: the reachable value t-tuples (pairs at strength 2; one
            parameter: values).
        pairs_covered: Pairwise only: the t-tuples the kept cases cover.
        truncated: Whether ``max_cases`` cut the cases.
        cases_needed: Pairwise only: the cases of the full-coverage suite, which is more
            than ``len(cases)`` when ``truncated``.
        strength: Pairwise only: the t of the t-tuples (at most the number of parameters).
        lower_bound: Pairwise only: the fewest cases any full suite can have (the most
            reachable tuples over any t parameters).
    """

    cases: list[dict[str, Any]]
    cartesian: int
    pairs_total: int = 0
    pairs_covered: int = 0
    truncated: bool = False
    cases_needed: int = 0
    strength: int = 0
    lower_bound: int = 0


def _key(value: Any) -> str:
    # Values compare by their JSON form: 1, 1.0 and true are different parameter values.
    # repr() stands in for what JSON cannot encode (a YAML date), rather than failing.
    return json.dumps(value, sort_keys=True, default=repr)


class _Space:
    """The matrix as value indexes: exclusions and required cases compiled to indexes."""

    def __init__(self, spec: MatrixSpec) -> None:
        self.names = list(spec.params)
        self.values = [spec.params[n] for n in self.names]
        self.sizes = [len(v) for v in self.values]
        keys = [[_key(v) for v in vals] for vals in self.values]

        def indexes(entry: dict[str, Any]) -> dict[int, frozenset[int]]:
            out = {}
            for name, value in entry.items():
                i = self.names.index(name)
                out[i] = frozenset(k for k, key in enumerate(keys[i]) if key == _key(value))
            return out

        rules: list[Rule] = [indexes(entry) for entry in spec.exclude]
        self.cons = Constraints(self.sizes, rules, _SEARCH_BUDGET)
        # A required value that the matrix lists twice (equal JSON) takes its first index.
        self.include = [{i: min(vs) for i, vs in indexes(entry).items()} for entry in spec.include]

    def case(self, row: Row) -> dict[str, Any]:
        return {n: self.values[i][v] for i, (n, v) in enumerate(zip(self.names, row, strict=True))}

    @property
    def cartesian(self) -> int:
        return math.prod(self.sizes)


def expand(spec: MatrixSpec) -> Expansion:
    """The cases of a matrix.

    Raises:
        ValueError: The matrix is above a limit, its exclusions remove every case or a
            required case, or they are too intricate to search.
    """
    space = _Space(spec)
    cons = space.cons
    limit = spec.max_cases
    if not cons.completable([None] * len(space.sizes)):
        raise ValueError("the exclusions remove every case")
    if spec.strategy in ("scenario_only", "cartesian"):
        cap = 1 if spec.strategy == "scenario_only" else (limit or MAX_CASES)
        if cons.rules:
            ordered = space.sizes.__getitem__  # values in declaration order
            found = cons.rows([None] * len(space.sizes), range(len(space.sizes)), lambda p: range(ordered(p)))
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
                f"{' (before exclusions)' if cons.rules else ''}: set max_cases or use strategy pairwise"
            )
        truncated = len(rows) > cap
        return Expansion([space.case(r) for r in rows[:cap]], space.cartesian, truncated=truncated)
    return _pairwise(spec, space)


def _pairwise(spec: MatrixSpec, space: _Space) -> Expansion:
    sizes, cons, limit = space.sizes, space.cons, spec.max_cases
    t = min(spec.strength, len(sizes))
    effort = _EFFORTS[spec.effort]
    required: list[list[int | None]] = []
    for k, entry in enumerate(space.include):
        partial: list[int | None] = [None] * len(sizes)
        for i, v in entry.items():
            partial[i] = v
        if not cons.completable(partial):
            hit = [j for j, rule in enumerate(cons.rules) if all(partial[i] in vs for i, vs in rule.items())]
            why = f"matches exclude[{hit[0]}]" if hit else "cannot be completed into an allowed case"
            raise ValueError(f"include[{k}] {spec.include[k]} {why}")
        required.append(partial)
    if limit is not None and len(required) > limit:
        raise ValueError(f"include has {len(required)} cases, above max_cases ({limit})")
    if t == 1:  # one parameter, no pairs: every value once
        want = sorted({v for p in required for v in p if v is not None})
        rows: list[Row] = [(v,) for v in want]
        rows += [(v,) for v in range(sizes[0]) if v not in want and cons.allowed((v,))]
        kept = rows[:limit] if limit else rows
        return Expansion(
            [space.case(r) for r in kept],
            space.cartesian,
            pairs_total=len(rows),
            pairs_covered=len(kept),
            truncated=len(kept) < len(rows),
            cases_needed=len(rows),
            strength=1,
            lower_bound=len(rows),
        )

    _check_size(sizes, t, effort, bool(cons.rules))
    tuples = Tuples(sizes, t)
    suite = Suite(tuples, cons)
    rng = random.Random(SEED)
    for partial in required:
        made = suite.build(partial, rng, effort.tries)
        assert made is not None  # completable, checked above
        suite.add(made, locked=frozenset(i for i, v in enumerate(partial) if v is not None))
    _, _, fits = draft_cost(sizes, t, effort.allpairs, effort.tries)
    if fits:
        declared = list(range(len(sizes)))
        rows, spent, complete = allpairs(cons, declared, effort.allpairs)
        # allpairspy is greedy in parameter order: largest domains first often gives a
        # smaller suite. Tried only when the first run left room for a second one as long.
        by_size = sorted(declared, key=lambda i: -sizes[i])
        if by_size != declared and complete and 2 * spent <= effort.allpairs:
            other, _, done = allpairs(cons, by_size, effort.allpairs - spent)
            if done and len(other) < len(rows):
                rows = other
        for r in rows:
            if cons.allowed(r):  # allpairspy's last word is only checked on complete rows
                suite.add(r)
    suite.complete(rng, limit=MAX_CASES, tries=effort.tries)
    # The most reachable tuples over any t parameters: each needs its own case.
    floor = max(suite.need[b:e].count(1) for b, e in itertools.pairwise([*tuples.base, tuples.total]))
    # Required cases were added first and are never deleted, so they lead, in their order.
    ordered = shrink(
        suite, *effort.budget(tuples.total), floor, rng, targets=effort.targets, spread=effort.spread
    )
    total, held = verify(tuples, cons, ordered)
    if held != total:
        raise AssertionError(f"coverage {held}/{total}: a bug in taskexec.plan.matrix")
    if len(ordered) > (limit or MAX_CASES):
        if limit is None:
            raise ValueError(f"the pairwise suite has {len(ordered)} cases, above the limit of {MAX_CASES}")
        kept, covered = most_covering(ordered, len(required), tuples, limit)
    else:
        kept, covered = ordered, held
    return Expansion(
        [space.case(r) for r in kept],
        space.cartesian,
        pairs_total=total,
        pairs_covered=covered,
        truncated=len(kept) < len(ordered),
        cases_needed=len(ordered),
        strength=t,
        lower_bound=floor,
    )


def _check_size(sizes: list[int], t: int, effort: _Effort, constrained: bool) -> None:
    """Refuse, before any work, a matrix above the tuple, case, time or memory limits."""
    what = f"{len(sizes)} parameters, {sum(sizes)} values"
    count = tuple_count(sizes, t)
    kind = "pairs" if t == 2 else f"{t}-tuples"
    if count > MAX_TUPLES:
        name = "pairwise" if t == 2 else f"strength-{t}"
        raise ValueError(
            f"the matrix has {count} value {kind}, above the {name} limit of {MAX_TUPLES} "
            f"({what}): lower the strength or split the matrix"
        )
    bound = lower_bound(sizes, t)
    if not constrained and bound > MAX_CASES:
        raise ValueError(
            f"a suite of strength {t} of this matrix needs at least {bound} cases, "
            f"above the limit of {MAX_CASES}: use strategy cartesian with max_cases"
        )
    rows, seconds, _ = draft_cost(sizes, t, effort.allpairs, effort.tries)
    memory = count * 12 + math.comb(len(sizes), t) * (200 + 8 * rows)
    if seconds > MAX_DRAFT_SECONDS or memory > MAX_MEMORY:
        raise ValueError(
            f"a first draft of this matrix ({what}, {count} value {kind}, about {rows} cases) "
            f"would take about {seconds:.0f} s and {memory / 2**20:.0f} MiB, above the limits of "
            f"{MAX_DRAFT_SECONDS:.0f} s and {MAX_MEMORY // 2**20} MiB: lower the strength or split the matrix"
        )
