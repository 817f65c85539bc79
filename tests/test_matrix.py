"""Matrix expansion: cartesian, scenario_only and pairwise cases, exclusions, limits, determinism.

Coverage is checked here independently of :mod:`taskexec.plan.matrix`: pairs are read back from
the case dicts, and reachable pairs under exclusions come from a brute-force product.
"""

from __future__ import annotations

import gc
import itertools
import json
import re
import tracemalloc
from typing import Any

import pytest
from allpairspy import AllPairs, pairs_storage
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from taskexec.plan.matrix import MAX_CASES, MAX_PAIRS, Expansion, MatrixSpec, expand, lower_bound

Params = dict[str, list[Any]]
Pair = tuple[str, str, str, str]  # (param, value key, param, value key)


def key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def pairs_of(case: dict[str, Any], names: list[str]) -> set[Pair]:
    keys = {n: key(case[n]) for n in names}
    return {(a, keys[a], b, keys[b]) for a, b in itertools.combinations(names, 2)}


def all_pairs(params: Params) -> set[Pair]:
    keys = {n: [key(v) for v in vs] for n, vs in params.items()}
    return {(a, x, b, y) for a, b in itertools.combinations(keys, 2) for x in keys[a] for y in keys[b]}


def excluded(case: dict[str, Any], exclude: list[dict[str, Any]]) -> bool:
    return any(all(key(case[k]) == key(v) for k, v in entry.items()) for entry in exclude)


def allowed_product(params: Params, exclude: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every case no exclusion matches, in declaration order: the brute-force reference."""
    names = list(params)
    cases = (dict(zip(names, combo, strict=True)) for combo in itertools.product(*params.values()))
    return [c for c in cases if not excluded(c, exclude)]


def covered(exp: Expansion, params: Params) -> set[Pair]:
    names = list(params)
    return set().union(*(pairs_of(c, names) for c in exp.cases))


def uniform(sizes: list[int]) -> Params:
    """A model with distinct, readable values: p3 = ["p3.0", "p3.1", ...]."""
    return {f"p{i}": [f"p{i}.{k}" for k in range(s)] for i, s in enumerate(sizes)}


# --- cartesian -----------------------------------------------------------------------------


def test_cartesian_is_the_product_in_declaration_order() -> None:
    params: Params = {"model": ["a", "b"], "t": [0, 0.7], "lang": ["en", "zh", "fr"]}
    exp = expand(MatrixSpec(strategy="cartesian", params=params))
    assert exp.cases == allowed_product(params, [])
    assert exp.cartesian == 12
    assert not exp.truncated


def test_cartesian_stops_at_max_cases_and_says_so() -> None:
    params = uniform([3, 3, 3])
    exp = expand(MatrixSpec(strategy="cartesian", params=params, max_cases=5))
    assert exp.cases == allowed_product(params, [])[:5]
    assert exp.truncated
    assert exp.cartesian == 27
    exact = expand(MatrixSpec(strategy="cartesian", params=params, max_cases=27))
    assert len(exact.cases) == 27
    assert not exact.truncated


def test_cartesian_above_the_limit_needs_max_cases() -> None:
    params = uniform([10] * 6)  # a million cases
    with pytest.raises(ValueError, match="set max_cases"):
        expand(MatrixSpec(strategy="cartesian", params=params))
    exp = expand(MatrixSpec(strategy="cartesian", params=params, max_cases=3))
    assert len(exp.cases) == 3
    assert exp.truncated
    assert exp.cartesian == 10**6


def test_cartesian_with_exclusions() -> None:
    params: Params = {"model": ["a", "b", "c"], "lang": ["en", "zh"]}
    exclude = [{"model": "c", "lang": "zh"}, {"model": "a"}]
    exp = expand(MatrixSpec(strategy="cartesian", params=params, exclude=exclude))
    assert exp.cases == [
        {"model": "b", "lang": "en"},
        {"model": "b", "lang": "zh"},
        {"model": "c", "lang": "en"},
    ]
    assert exp.cartesian == 6


# --- scenario_only -------------------------------------------------------------------------


def test_scenario_only_takes_the_first_value_of_each_parameter() -> None:
    exp = expand(MatrixSpec(strategy="scenario_only", params={"a": [1, 2], "b": ["x", "y"], "c": [None]}))
    assert exp.cases == [{"a": 1, "b": "x", "c": None}]
    assert exp.cartesian == 4


def test_scenario_only_with_exclusions_takes_the_first_allowed_combination() -> None:
    params: Params = {"a": [1, 2], "b": ["x", "y"]}
    exp = expand(MatrixSpec(strategy="scenario_only", params=params, exclude=[{"a": 1, "b": "x"}]))
    assert exp.cases == [{"a": 1, "b": "y"}]
    exp = expand(MatrixSpec(strategy="scenario_only", params=params, exclude=[{"a": 1}]))
    assert exp.cases == [{"a": 2, "b": "x"}]


# --- pairwise ------------------------------------------------------------------------------


def test_pairwise_of_the_design_example() -> None:
    params: Params = {"model": ["a", "b", "c"], "temperature": [0, 0.7], "lang": ["en", "zh", "fr"]}
    exp = expand(MatrixSpec(params=params))
    assert covered(exp, params) == all_pairs(params)
    assert len(exp.cases) == lower_bound([3, 2, 3]) == 9
    assert exp.pairs_total == exp.pairs_covered == len(all_pairs(params))
    assert exp.cases_needed == len(exp.cases)
    assert exp.cartesian == 18
    assert not exp.truncated


def test_pairwise_keeps_every_dimension_of_a_wide_model() -> None:
    params = uniform([2] * 100)
    exp = expand(MatrixSpec(params=params))
    assert covered(exp, params) == all_pairs(params)
    assert exp.pairs_covered == exp.pairs_total == 19_800
    assert all(len(c) == 100 for c in exp.cases)


@pytest.mark.parametrize("sizes", [[3] * 4, [3] * 13, [8, 7, 6, 5, 4, 3], [5] * 10, [2, 3, 4, 2, 3]])
def test_pairwise_is_never_larger_than_allpairspy_alone(sizes: list[int]) -> None:
    exp = expand(MatrixSpec(params=uniform(sizes)))
    direct = list(AllPairs([list(range(s)) for s in sizes]))
    assert len(exp.cases) <= len(direct)
    assert len(exp.cases) >= lower_bound(sizes)


def test_pairwise_values_of_any_json_type_stay_distinct() -> None:
    # 1, 1.0 and true are three values; dicts and lists are values too.
    params: Params = {"x": [1, 1.0, True], "y": [{"k": [1]}, [1, 2], None], "z": ["1", 0]}
    exp = expand(MatrixSpec(params=params))
    assert covered(exp, params) == all_pairs(params)
    assert {key(c["x"]) for c in exp.cases} == {"1", "1.0", "true"}


def test_pairwise_with_one_parameter_lists_every_value() -> None:
    exp = expand(MatrixSpec(params={"a": [1, 2, 3]}, exclude=[{"a": 2}]))
    assert exp.cases == [{"a": 1}, {"a": 3}]
    assert exp.pairs_total == exp.pairs_covered == 2


def test_pairwise_of_the_design_example_with_exclusions() -> None:
    params: Params = {"model": ["a", "b", "c"], "temperature": [0, 0.7], "lang": ["en", "zh", "fr"]}
    exclude = [{"model": "c", "lang": "zh"}, {"model": "a", "temperature": 0.7}]
    exp = expand(MatrixSpec(params=params, exclude=exclude))
    reachable = set().union(*(pairs_of(c, list(params)) for c in allowed_product(params, exclude)))
    assert covered(exp, params) == reachable
    assert not any(excluded(c, exclude) for c in exp.cases)
    assert exp.pairs_total == exp.pairs_covered == len(reachable) == len(all_pairs(params)) - 2


def test_pairwise_value_reachable_only_through_two_free_parameters() -> None:
    # a=1 is unreachable, but no exclusion says so alone: only y and z together, after 40
    # unconstrained parameters. A search that fills parameters in order would try 2^40 rows.
    params: Params = {"a": [0, 1], **{f"m{i}": [0, 1] for i in range(40)}, "y": [0, 1], "z": [0, 1]}
    exclude = [{"a": 1, "y": y, "z": z} for y in (0, 1) for z in (0, 1)]
    exp = expand(MatrixSpec(params=params, exclude=exclude))
    assert all(c["a"] == 0 for c in exp.cases)
    without_a1 = {p for p in all_pairs(params) if ("a", "1") not in {p[:2], p[2:]}}
    assert covered(exp, params) == without_a1
    assert exp.pairs_total == exp.pairs_covered == len(without_a1)
    first = expand(MatrixSpec(strategy="scenario_only", params={"a": [1, 0], **params}, exclude=exclude))
    assert first.cases[0]["a"] == 0


def test_pairwise_max_cases_keeps_the_most_covering_cases_and_says_what_full_coverage_needs() -> None:
    params = uniform([4, 4, 3, 3, 2])
    full = expand(MatrixSpec(params=params))
    cut = expand(MatrixSpec(params=params, max_cases=5))
    assert len(cut.cases) == 5
    assert cut.truncated
    assert cut.cases_needed == len(full.cases) > 5
    assert cut.pairs_total == full.pairs_total == len(all_pairs(params))
    assert cut.pairs_covered == len(covered(cut, params)) < cut.pairs_total
    assert all(c in full.cases for c in cut.cases)
    roomy = expand(MatrixSpec(params=params, max_cases=len(full.cases)))
    assert roomy == full


# --- exclusions: validation and emptiness --------------------------------------------------


@pytest.mark.parametrize(
    ("exclude", "message"),
    [
        ([{"model": "d"}], r"exclude\[0\]\.model: 'd' is not a value of 'model'"),
        ([{"t": 0.0}], r"exclude\[0\]\.t: 0\.0 is not a value"),  # 0.0 is not 0
        ([{"model": "a"}, {"size": 1}], r"exclude\[1\] names 'size'"),
        ([{}], r"exclude\[0\] is empty"),
    ],
)
def test_an_exclusion_must_name_values_of_the_matrix(exclude: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MatrixSpec(params={"model": ["a", "b"], "t": [0, 1]}, exclude=exclude)


@pytest.mark.parametrize("strategy", ["pairwise", "cartesian", "scenario_only"])
@pytest.mark.parametrize(
    "exclude",
    [
        [{"a": 1}, {"a": 2}],  # every value of one parameter
        [{"a": a, "b": b} for a in (1, 2) for b in "xy"],  # every combination, pair by pair
        [{"a": 1}, {"a": 2, "b": "x"}, {"a": 2, "b": "y", "c": True}],  # only the search sees it
    ],
)
def test_excluding_everything_is_an_error(strategy: str, exclude: list[dict[str, Any]]) -> None:
    spec = MatrixSpec(strategy=strategy, params={"a": [1, 2], "b": ["x", "y"], "c": [True]}, exclude=exclude)
    with pytest.raises(ValueError, match="the exclusions remove every case"):
        expand(spec)


# --- limits and determinism ----------------------------------------------------------------


def test_limits() -> None:
    with pytest.raises(ValidationError):
        MatrixSpec(params=uniform([2] * 201))
    with pytest.raises(ValidationError):
        MatrixSpec(params={"a": []})
    with pytest.raises(ValidationError):
        MatrixSpec(params={"a": [1]}, max_cases=MAX_CASES + 1)
    with pytest.raises(ValueError, match="value pairs, above the pairwise limit"):
        expand(MatrixSpec(params=uniform([1_001, 1_000])))
    assert MAX_PAIRS < 1_001 * 1_000
    with pytest.raises(ValueError, match="needs at least 160000 cases"):
        expand(MatrixSpec(params=uniform([400, 400, 2])))
    assert len(MatrixSpec(params=uniform([2] * 200)).params) == 200


def test_generation_is_deterministic() -> None:
    # Across processes and hash seeds too: tests/test_covering.py runs this spec in two.
    spec = MatrixSpec(
        params={"m": ["a", "b", "c"], "t": [0, 0.5, 1], "x": [{"k": 1}, None], **uniform([3, 2, 4, 2])},
        exclude=[{"m": "a", "t": 0.5}, {"x": None, "p0": "p0.1"}, {"m": "c", "p2": "p2.3", "p3": "p3.0"}],
    )
    assert expand(spec).cases == expand(spec).cases


def test_memory_stays_flat_over_many_expansions() -> None:
    # allpairspy memoises every value combination in a module-level dict that only grows.
    # Effort fast: tracemalloc slows the post-optimiser's steps tenfold, and they allocate
    # the same either way.
    spec = MatrixSpec(params=uniform([3] * 8), exclude=[{"p0": "p0.0", "p1": "p1.1"}], effort="fast")
    expand(spec)
    assert not pairs_storage.key_cache
    tracemalloc.start()
    try:
        expand(spec)
        gc.collect()  # retained memory, not garbage the collector has yet to free
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            expand(spec)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"{growth} bytes retained by 20 expansions"


def test_a_plan_manifest_records_cases_and_the_cartesian_count() -> None:
    from taskexec.plan import parse_plan
    from taskexec.plan.compiler import compile_plan
    from taskexec.settings import Settings

    matrix = {"strategy": "pairwise", "max_cases": 4, "params": uniform([3, 3, 3])}
    doc = {"tasks": [{"id": "s", "handler": "stub", "matrix": matrix}]}
    [manifest] = compile_plan(parse_plan(doc), Settings(allowed_handlers="stub"))
    [info] = manifest.matrices
    assert (info.cases, info.cartesian, info.truncated) == (4, 27, True)
    assert info.pairs_covered < info.pairs_total == 27
    assert (info.strength, info.effort, info.lower_bound, info.cases_needed) == (2, "balanced", 9, 9)
    doc["tasks"][0]["matrix"] = {"strategy": "cartesian", "params": uniform([2, 2])}
    [manifest] = compile_plan(parse_plan(doc), Settings(allowed_handlers="stub"))
    assert manifest.matrices[0].strength is manifest.matrices[0].effort is None


# --- properties ----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=2, max_size=30))
def test_pairwise_covers_every_pair(sizes: list[int]) -> None:
    # Effort fast: coverage is the verifier's, whatever the effort; the time is the search's.
    params = uniform(sizes)
    exp = expand(MatrixSpec(params=params, effort="fast"))
    assert covered(exp, params) == all_pairs(params)
    assert exp.pairs_total == exp.pairs_covered == len(all_pairs(params))
    assert lower_bound(sizes) <= len(exp.cases) == exp.cases_needed


@st.composite
def constrained(draw: st.DrawFn) -> tuple[Params, list[dict[str, Any]]]:
    """A small model (brute force stays cheap) and exclusions of one to three keys."""
    params = uniform(draw(st.lists(st.integers(1, 4), min_size=2, max_size=5)))
    names = list(params)
    exclude = []
    for _ in range(draw(st.integers(0, 6))):
        keys = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        exclude.append({k: draw(st.sampled_from(params[k])) for k in keys})
    return params, exclude


@settings(max_examples=150, deadline=None)
@given(constrained())
def test_pairwise_with_exclusions_covers_every_reachable_pair(
    model: tuple[Params, list[dict[str, Any]]],
) -> None:
    params, exclude = model
    spec = MatrixSpec(params=params, exclude=exclude, effort="fast")
    allowed = allowed_product(params, exclude)
    if not allowed:
        with pytest.raises(ValueError, match="remove every case"):
            expand(spec)
        return
    exp = expand(spec)
    assert not any(excluded(c, exclude) for c in exp.cases)
    if len(params) > 1:
        reachable = set().union(*(pairs_of(c, list(params)) for c in allowed))
        assert covered(exp, params) == reachable
        assert exp.pairs_total == exp.pairs_covered == len(reachable)


@settings(max_examples=80, deadline=None)
@given(constrained(), st.integers(1, 20))
def test_cartesian_and_scenario_only_with_exclusions(
    model: tuple[Params, list[dict[str, Any]]], max_cases: int
) -> None:
    params, exclude = model
    allowed = allowed_product(params, exclude)
    for strategy, want in (("cartesian", allowed[:max_cases]), ("scenario_only", allowed[:1])):
        spec = MatrixSpec(strategy=strategy, params=params, exclude=exclude, max_cases=max_cases)
        if not allowed:
            with pytest.raises(ValueError, match="remove every case"):
                expand(spec)
            continue
        exp = expand(spec)
        assert exp.cases == want
        assert exp.truncated == (strategy == "cartesian" and len(allowed) > max_cases)


def test_compile_says_the_strength_effort_and_lower_bound(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from taskexec.cli import main

    plan = tmp_path / "m.yaml"
    matrices = [
        {"strategy": "pairwise", "strength": 3, "effort": "fast", "params": uniform([3, 3, 2, 4])},
        {"strategy": "pairwise", "max_cases": 4, "params": uniform([3, 3, 3])},
        {"strategy": "cartesian", "params": uniform([2, 2])},
    ]
    tasks = [{"id": f"m{k}", "handler": "stub", "matrix": m} for k, m in enumerate(matrices)]
    plan.write_text(json.dumps({"tasks": tasks}))
    out = CliRunner().invoke(main, ["compile", str(plan)], env={"TASKEXEC_ALLOWED_HANDLERS": "stub"})
    assert out.exit_code == 0, out.output
    lines = [line.strip() for line in out.output.splitlines() if line.strip().startswith("matrix")]
    assert lines[0].startswith("matrix m0: pairwise (strength 3, effort fast), ")
    assert lines[0].endswith("of 72 combinations, lower bound 36")
    kept = r"matrix m1: pairwise \(strength 2, effort balanced\), kept 4 of the 9 needed: (\d+)/27 pairs, "
    kept += "lower bound 9"
    found = re.fullmatch(kept, lines[1])
    assert found is not None, lines[1]
    assert 0 < int(found[1]) < 27
    assert lines[2] == "matrix m2: cartesian, 4 of 4 combinations"
