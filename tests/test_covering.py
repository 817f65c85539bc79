"""The pairwise engine's options: strength 3 and 4, required cases, effort, limits, verification.

As in test_matrix.py, coverage is counted here from the case dicts, and the reachable
t-tuples under exclusions come from a brute-force product, independently of the engine.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from taskexec.plan.covering import Constraints, Tuples, verify
from taskexec.plan.matrix import MAX_TUPLES, MatrixSpec, expand, lower_bound

Params = dict[str, list[Any]]
Entry = dict[str, Any]


def key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def uniform(sizes: list[int]) -> Params:
    return {f"p{i}": [f"p{i}.{k}" for k in range(s)] for i, s in enumerate(sizes)}


def tuples_of(case: dict[str, Any], names: list[str], t: int) -> set[tuple[tuple[str, str], ...]]:
    return {tuple((n, key(case[n])) for n in cols) for cols in itertools.combinations(names, t)}


def matches(case: dict[str, Any], entry: Entry) -> bool:
    return all(key(case[k]) == key(v) for k, v in entry.items())


def allowed_product(params: Params, exclude: list[Entry]) -> list[dict[str, Any]]:
    names = list(params)
    cases = (dict(zip(names, combo, strict=True)) for combo in itertools.product(*params.values()))
    return [c for c in cases if not any(matches(c, e) for e in exclude)]


def check(
    params: Params, exclude: list[Entry], include: list[Entry], t: int, cases: list[dict[str, Any]]
) -> int:
    """Every reachable t-tuple covered, no excluded case, the required cases first, in order.

    Returns:
        The number of reachable t-tuples.
    """
    names = list(params)
    t = min(t, len(names))
    reachable = set().union(*(tuples_of(c, names, t) for c in allowed_product(params, exclude)))
    assert set().union(*(tuples_of(c, names, t) for c in cases)) == reachable
    assert not any(matches(c, e) for c in cases for e in exclude)
    assert all(matches(c, e) for c, e in zip(cases, include, strict=False))
    return len(reachable)


# --- strength ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "t", "most"), [([3] * 4, 3, 27), ([2] * 8, 3, 12), ([2] * 6, 4, 24), ([3, 2], 3, 6)]
)
def test_strength_covers_every_t_tuple(sizes: list[int], t: int, most: int) -> None:
    params = uniform(sizes)
    exp = expand(MatrixSpec(params=params, strength=t))
    reachable = check(params, [], [], t, exp.cases)
    assert exp.strength == min(t, len(sizes))
    assert exp.lower_bound == lower_bound(sizes, t) <= len(exp.cases) <= most
    assert exp.pairs_total == exp.pairs_covered == reachable


def test_strength_3_with_exclusions_covers_every_reachable_triple() -> None:
    params = uniform([3, 3, 2, 2, 3])
    exclude = [{"p0": "p0.0", "p1": "p1.1"}, {"p2": "p2.1", "p3": "p3.0", "p4": "p4.2"}, {"p1": "p1.2"}]
    exp = expand(MatrixSpec(params=params, strength=3, exclude=exclude))
    reachable = check(params, exclude, [], 3, exp.cases)
    assert exp.pairs_covered == exp.pairs_total == reachable < Tuples([3, 3, 2, 2, 3], 3).total


def test_strength_applies_to_pairwise_only() -> None:
    with pytest.raises(ValidationError, match="strength applies to strategy pairwise only"):
        MatrixSpec(strategy="cartesian", params={"a": [1]}, strength=3)
    with pytest.raises(ValidationError):
        MatrixSpec(params={"a": [1]}, strength=5)


# --- required cases ------------------------------------------------------------------------


def test_required_cases_come_first_completed_and_covered() -> None:
    params: Params = {"model": ["a", "b", "c"], "t": [0, 0.7], "lang": ["en", "zh", "fr"], "n": [1, 2]}
    include: list[Entry] = [
        {"model": "c", "t": 0.7, "lang": "fr", "n": 2},
        {"lang": "zh"},
        {"model": "c", "n": 1},
    ]
    exclude: list[Entry] = [{"model": "c", "lang": "zh"}]
    exp = expand(MatrixSpec(params=params, include=include, exclude=exclude))
    check(params, exclude, include, 2, exp.cases)
    assert exp.cases[0] == {"model": "c", "t": 0.7, "lang": "fr", "n": 2}
    # The completion serves coverage: the three required cases do not repeat a pair needlessly.
    assert len(exp.cases) <= 9


def test_a_required_case_that_an_exclusion_removes_is_an_error() -> None:
    params: Params = {"model": ["a", "b"], "lang": ["en", "zh"], "n": [1, 2]}
    with pytest.raises(ValueError, match=r"include\[1\] \{'model': 'b', 'lang': 'zh'\} matches exclude\[0\]"):
        expand(
            MatrixSpec(
                params=params,
                include=[{"n": 1}, {"model": "b", "lang": "zh"}],
                exclude=[{"model": "b", "lang": "zh"}],
            )
        )
    # Excluded only through a third parameter: no single exclusion matches the entry.
    exclude: list[Entry] = [{"model": "b", "n": 1}, {"model": "b", "n": 2}]
    with pytest.raises(ValueError, match=r"include\[0\] .* cannot be completed into an allowed case"):
        expand(MatrixSpec(params=params, include=[{"model": "b"}], exclude=exclude))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"include": [{"model": "z"}]}, r"include\[0\]\.model: 'z' is not a value of 'model'"),
        ({"include": [{"size": 1}]}, r"include\[0\] names 'size'"),
        ({"include": [{}]}, r"include\[0\] is empty"),
        ({"include": [{"model": "a"}], "strategy": "cartesian"}, "include applies to strategy pairwise only"),
        ({"effort": "fast", "strategy": "scenario_only"}, "effort applies to strategy pairwise only"),
        ({"effort": "slow"}, "effort"),
    ],
)
def test_invalid_required_cases_and_options(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MatrixSpec.model_validate({"params": {"model": ["a", "b"], "lang": ["en"]}, **spec})


def test_max_cases_keeps_the_required_cases() -> None:
    params = uniform([3, 3, 3, 3])
    include: list[Entry] = [{"p0": "p0.2", "p1": "p1.2"}, {"p2": "p2.1"}]
    cut = expand(MatrixSpec(params=params, include=include, max_cases=3))
    assert len(cut.cases) == 3 and cut.truncated
    assert matches(cut.cases[0], include[0]) and matches(cut.cases[1], include[1])
    with pytest.raises(ValueError, match=r"include has 2 cases, above max_cases \(1\)"):
        expand(MatrixSpec(params=params, include=include, max_cases=1))


# --- effort, limits, verification ----------------------------------------------------------


def test_more_effort_never_gives_a_larger_suite() -> None:
    spec = MatrixSpec(params=uniform([3] * 7))
    sizes = [
        len(expand(spec.model_copy(update={"effort": e})).cases) for e in ("fast", "balanced", "thorough")
    ]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] <= 15  # allpairspy: 15; best known: 12 (Colbourn's tables)


@pytest.mark.parametrize(
    ("sizes", "t", "message"),
    [
        (
            [10] * 30,
            3,
            r"value 3-tuples, above the strength-3 limit of 1000000 \(30 parameters, 300 values\)",
        ),
        ([20] * 4, 4, r"a suite of strength 4 of this matrix needs at least 160000 cases"),
        ([7] * 200, 2, r"would take about \d+ s and \d+ MiB, above the limits of 5 s and 512 MiB"),
    ],
)
def test_matrices_above_the_limits_are_refused_before_any_work(
    sizes: list[int], t: int, message: str
) -> None:
    spec = MatrixSpec(params=uniform(sizes), strength=t)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        expand(spec)
    assert time.perf_counter() - start < 1.0
    assert MAX_TUPLES == 1_000_000


def test_verify_recounts_and_catches_a_gap_or_an_excluded_row() -> None:
    tuples = Tuples([2, 2, 2], 2)
    free = Constraints([2, 2, 2], [], 1000)
    rows = [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)]
    assert verify(tuples, free, rows) == (12, 12)
    with pytest.raises(AssertionError, match=r"tuple \(0, 1\)=\[1, 1\] is reachable but not covered"):
        verify(tuples, free, rows[:3])
    banned = Constraints([2, 2, 2], [{0: frozenset({1}), 1: frozenset({1})}], 1000)
    with pytest.raises(AssertionError, match="an excluded case"):
        verify(tuples, banned, rows)
    # Without (p0=1, p1=1), which no allowed row can hold: 11 tuples, all held.
    assert verify(tuples, banned, [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 0, 0), (0, 1, 0)]) == (11, 11)


def test_suites_are_identical_across_processes_and_hash_seeds() -> None:
    params = {"m": ["a", "b", "c"], "t": [0, 0.5, 1], "x": [{"k": 1}, None], **uniform([3, 2, 4, 2])}
    specs = [
        MatrixSpec(
            params=params,
            exclude=[{"m": "a", "t": 0.5}, {"x": None, "p0": "p0.1"}, {"m": "c", "p2": "p2.3", "p3": "p3.0"}],
        ),
        MatrixSpec(
            params=params, exclude=[{"m": "a", "t": 0.5}], include=[{"m": "c", "p2": "p2.3"}], strength=3
        ),
    ]
    code = (
        "import json, sys; from taskexec.plan.matrix import MatrixSpec, expand; "
        "print(json.dumps([expand(MatrixSpec.model_validate(s)).cases for s in json.load(sys.stdin)]))"
    )
    # This process hashes strings with a random seed (pytest sets none); the other, with 1.
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([s.model_dump() for s in specs]),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "1"},
    )
    assert json.loads(out.stdout) == [expand(s).cases for s in specs]


# --- properties ----------------------------------------------------------------------------


@st.composite
def models(draw: st.DrawFn) -> tuple[Params, list[Entry], list[Entry], int]:
    """A small model (brute force stays cheap), exclusions, required cases and a strength."""
    params = uniform(draw(st.lists(st.integers(1, 4), min_size=2, max_size=5)))
    names = list(params)

    def entries(most: int) -> list[Entry]:
        out = []
        for _ in range(draw(st.integers(0, most))):
            keys = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
            out.append({k: draw(st.sampled_from(params[k])) for k in keys})
        return out

    return params, entries(5), entries(3), draw(st.integers(2, 3))


@settings(max_examples=80, deadline=None)
@given(models())
def test_any_model_with_exclusions_and_required_cases(
    model: tuple[Params, list[Entry], list[Entry], int],
) -> None:
    params, exclude, include, t = model
    spec = MatrixSpec(params=params, exclude=exclude, include=include, strength=t, effort="fast")
    allowed = allowed_product(params, exclude)
    possible = [e for e in include if any(matches(c, e) for c in allowed)]
    if not allowed or possible != include:
        with pytest.raises(ValueError, match=r"remove every case|include\[\d+\]"):
            expand(spec)
        return
    exp = expand(spec)
    check(params, exclude, include, t, exp.cases)
    assert exp.pairs_total == exp.pairs_covered
    assert exp.lower_bound <= len(exp.cases) == exp.cases_needed
    assert expand(spec) == exp  # deterministic


@settings(max_examples=25, deadline=None)
@given(models())
def test_thorough_search_keeps_exclusions_required_cases_and_determinism(
    model: tuple[Params, list[Entry], list[Entry], int],
) -> None:
    # Thorough effort weighs several uncovered tuples a step and deletes rows with random
    # ties: the same guarantees as the other efforts, and the same suite every time.
    params, exclude, include, t = model
    allowed = allowed_product(params, exclude)
    if not allowed or not all(any(matches(c, e) for c in allowed) for e in include):
        return
    spec = MatrixSpec(params=params, exclude=exclude, include=include, strength=t, effort="thorough")
    exp = expand(spec)
    check(params, exclude, include, t, exp.cases)
    assert exp.pairs_total == exp.pairs_covered
    assert len(exp.cases) <= len(expand(spec.model_copy(update={"effort": "fast"})).cases)
    assert expand(spec) == exp


@pytest.mark.integration  # a thorough search, 14 s: the full suite's tier
@pytest.mark.slow
def test_thorough_search_shrinks_a_constrained_uniform_model() -> None:
    params = uniform([4] * 8)
    exclude = [{"p0": "p0.0", "p1": "p1.1"}, {"p2": "p2.3", "p5": "p5.2"}]
    include = [{"p3": "p3.2", "p4": "p4.0"}]
    spec = MatrixSpec(params=params, exclude=exclude, include=include, effort="thorough")
    exp = expand(spec)
    check(params, exclude, include, 2, exp.cases)
    assert len(exp.cases) <= len(expand(spec.model_copy(update={"effort": "balanced"})).cases)
    assert len(exp.cases) <= 23  # as measured when thorough began to weigh several tuples a step
    assert expand(spec) == exp
