"""Compile rules: atomic tasks, inherited dependencies, matrix cases, stages, artifacts, errors."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskexec.errors import DependencyCycleError, HandlerNotAllowedError, PlanError
from taskexec.models import RunManifest
from taskexec.plan import parse_plan
from taskexec.plan.compiler import compile_plan
from taskexec.settings import Settings

SETTINGS = Settings(allowed_handlers="shell,http,stub,python:tests")


def compile_one(doc: dict[str, Any]) -> RunManifest:
    [m] = compile_plan(parse_plan(doc), SETTINGS)
    return m


def stub(tid: str, **kw: Any) -> dict[str, Any]:
    return {"id": tid, "handler": "stub", **kw}


def test_diamond_stages_and_artifacts() -> None:
    m = compile_one(
        {
            "id": "d",
            "tasks": [
                stub("a", output="greeting"),
                stub("b", depends_on=["a"]),
                stub("c", depends_on=["a"]),
                stub("d", depends_on=["b", "c"], inputs=["greeting"]),
            ],
        }
    )
    assert m.stages == [["a"], ["b", "c"], ["d"]]
    assert m.task("d").depends_on == ["b", "c"]
    assert m.task("d").inputs == ["greeting"]


def test_group_dependencies_are_inherited_and_a_group_dependency_means_all_descendants() -> None:
    m = compile_one(
        {
            "tasks": [
                stub("prep"),
                {
                    "id": "eval",
                    "depends_on": ["prep"],
                    "timeout": 5,
                    "tasks": [stub("s1"), {"id": "inner", "tasks": [stub("s2", timeout=7)]}],
                },
                stub("report", depends_on=["eval"]),
            ]
        }
    )
    assert m.task("s2").depends_on == ["prep"]
    assert m.task("s1").timeout == 5 and m.task("s2").timeout == 7
    assert sorted(m.task("report").depends_on) == ["s1", "s2"]
    assert m.stages == [["prep"], ["s1", "s2"], ["report"]]


def test_policy_merges_plan_defaults_group_and_task() -> None:
    m = compile_one(
        {
            "defaults": {"timeout": 9, "retry": {"max_attempts": 4, "backoff": 0.5}, "priority": 2},
            "tasks": [
                {"id": "g", "retry": {"multiplier": 3}, "tasks": [stub("t", retry={"max_attempts": 1})]}
            ],
        }
    )
    t = m.task("t")
    assert (t.timeout, t.priority) == (9, 2)
    assert (t.retry.max_attempts, t.retry.backoff, t.retry.multiplier) == (1, 0.5, 3)


def test_matrix_cases_and_dependency_on_a_matrix_task() -> None:
    m = compile_one(
        {
            "tasks": [
                stub(
                    "score",
                    params={"base": 1, "model": "x"},
                    output="scores",
                    matrix={"strategy": "cartesian", "params": {"model": ["a", "b"], "t": [0, 1]}},
                ),
                stub("after", depends_on=["score"], inputs=["scores"]),
            ]
        }
    )
    ids = [t.id for t in m.tasks if t.id.startswith("score[")]
    assert ids == ["score[0]", "score[1]", "score[2]", "score[3]"]
    assert m.task("score[0]").params == {"base": 1, "model": "a", "t": 0}
    assert m.task("after").depends_on == ids
    assert m.matrices[0].cases == 4 and m.matrices[0].cartesian == 4


def test_one_case_matrix_is_still_named_with_an_index() -> None:
    m = compile_one({"tasks": [stub("x", matrix={"strategy": "scenario_only", "params": {"p": [1, 2]}})]})
    assert [t.id for t in m.tasks] == ["x[0]"]


def test_variants_overlay_params_and_make_one_manifest_each() -> None:
    plan = parse_plan(
        {
            "variants": {"v1": {"word": "one"}, "v2": {"word": "two", "extra": True}},
            "tasks": [stub("t", params={"word": "none", "keep": 1})],
        }
    )
    ms = compile_plan(plan, SETTINGS)
    assert [(m.variant, m.tasks[0].params) for m in ms] == [
        ("v1", {"word": "one", "keep": 1}),
        ("v2", {"word": "two", "keep": 1, "extra": True}),
    ]
    [only] = compile_plan(plan, SETTINGS, variant="v2")
    assert only.variant == "v2"
    with pytest.raises(PlanError, match="unknown variant"):
        compile_plan(plan, SETTINGS, variant="v3")


@pytest.mark.parametrize(
    ("doc", "path", "words"),
    [
        ({"tasks": [stub("x", depends_on=["nowhere"])]}, "tasks[0].depends_on[0]", "unknown task 'nowhere'"),
        ({"tasks": [stub("x"), stub("x")]}, "tasks[1].id", "duplicate task id 'x'"),
        ({"tasks": [{"id": "g", "tasks": [stub("x")]}, stub("x")]}, "tasks[1].id", "duplicate"),
        ({"tasks": [stub("x", inputs=["never_made"])]}, "tasks[0].inputs[0]", "not produced by any upstream"),
        ({"tasks": [stub("a", output="o"), stub("b", inputs=["o"])]}, "tasks[1].inputs[0]", "not upstream"),
        ({"tasks": [stub("a", output="o"), stub("b", output="o")]}, "tasks[1].output", "already the output"),
        ({"tasks": [{"id": "x"}]}, "tasks[0].handler", "needs a handler"),
        ({"tasks": [{"id": "g", "handler": "stub", "tasks": [stub("x")]}]}, "tasks[0].handler", "group"),
        ({"tasks": [{"id": "g", "tasks": []}]}, "tasks[0].tasks", "at least one"),
        ({"tasks": [stub("x", rate_limit="llm")]}, "tasks[0].rate_limit", "unknown rate limit"),
        ({"tasks": [stub("x", timeout=99999)]}, "tasks[0].timeout", "maximum"),
        ({"tasks": [stub("x", matrix={"params": {}})]}, "tasks[0].matrix", ""),
        (
            {"tasks": [stub("x", params={"h": {"k": {"secret": "TASKEXEC_DATABASE_URL"}}})]},
            "tasks[0].params.h.k",
            "$TASKEXEC_DATABASE_URL is a setting of the worker",
        ),
        (
            {"tasks": [stub("x", params={"key": "TASKEXEC_WEBHOOK_SECRET"}, secret_params=["key"])]},
            "tasks[0].secret_params[0]",
            "never a secret a plan may read",
        ),
    ],
)
def test_plan_errors_name_the_field(doc: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(PlanError) as info:
        compile_one(doc)
    assert (info.value.path or "").startswith(path), info.value
    assert words in str(info.value)


def test_cycle_is_printed() -> None:
    with pytest.raises(DependencyCycleError) as info:
        compile_one(
            {
                "tasks": [
                    stub("x", depends_on=["y"]),
                    stub("y", depends_on=["z"]),
                    stub("z", depends_on=["x"]),
                    stub("free"),
                ]
            }
        )
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["x", "y", "z"]
    assert "dependency cycle: " in str(info.value) and " -> " in str(info.value)


def test_depending_on_your_own_group_is_a_cycle() -> None:
    with pytest.raises(DependencyCycleError):
        compile_one({"tasks": [{"id": "g", "tasks": [stub("a", depends_on=["g"])]}]})


def test_handlers_must_be_allowed() -> None:
    with pytest.raises(HandlerNotAllowedError) as info:
        compile_one({"tasks": [{"id": "x", "handler": "python:os:system"}]})
    assert str(info.value).startswith("E010 tasks[0].handler")
    compile_one({"tasks": [{"id": "x", "handler": "python:tests.handlers:echo"}]})
    with pytest.raises(HandlerNotAllowedError):
        compile_one({"tasks": [{"id": "x", "handler": "python:testsuite:f"}]})
    with pytest.raises(HandlerNotAllowedError):
        compile_one({"tasks": [{"id": "x", "handler": "nope"}]})


def test_compile_is_deterministic() -> None:
    doc = {
        "tasks": [
            stub("a"),
            stub(
                "m",
                depends_on=["a"],
                matrix={"params": {"x": [1, 2, 3], "y": ["a", "b"], "z": [True, False, None]}},
            ),
        ]
    }
    runs = [compile_plan(parse_plan(doc), SETTINGS)[0].model_dump_json() for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


# ---------------------------------------------------------------- properties


@st.composite
def random_plans(draw: st.DrawFn) -> dict[str, Any]:
    """A random tree of groups and atomic tasks; dependencies only on earlier-declared tasks."""
    n = draw(st.integers(1, 40))
    ids = [f"t{i}" for i in range(n)]
    parent: dict[int, int | None] = {}
    is_group = [draw(st.booleans()) if i < n - 1 else False for i in range(n)]
    nodes: dict[int, dict[str, Any]] = {}
    for i in range(n):
        # a parent is an earlier group; groups without children become atomic at the end
        groups = [j for j in range(i) if is_group[j]]
        parent[i] = draw(st.sampled_from([None, *groups])) if groups else None
        ancestors = set()
        p = parent[i]
        while p is not None:
            ancestors.add(p)
            p = parent[p]
        candidates = [j for j in range(i) if j not in ancestors]
        deps = draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True)) if candidates else []
        nodes[i] = {"id": ids[i], "depends_on": [ids[j] for j in deps]}
    children: dict[int | None, list[int]] = {}
    for i in range(n):
        children.setdefault(parent[i], []).append(i)

    def build(i: int) -> dict[str, Any]:
        node = nodes[i]
        kids = children.get(i, [])
        if kids:
            node["tasks"] = [build(k) for k in kids]
        else:
            node["handler"] = "stub"
        return node

    return {"tasks": [build(i) for i in children[None]]}


def _atomic_deps(doc: dict[str, Any]) -> dict[str, set[str]]:
    """Reference semantics, written independently: atomic id -> atomic ids it depends on."""
    atomic_under: dict[str, set[str]] = {}
    inherited: dict[str, list[str]] = {}

    def walk(node: dict[str, Any], inh: list[str]) -> set[str]:
        own = inh + node["depends_on"]
        if "tasks" in node:
            below = set().union(*(walk(c, own) for c in node["tasks"]))
        else:
            below = {node["id"]}
            inherited[node["id"]] = own
        atomic_under[node["id"]] = below
        return below

    for t in doc["tasks"]:
        walk(t, [])
    return {
        a: set().union(*(atomic_under[d] for d in deps)) if deps else set() for a, deps in inherited.items()
    }


def _has_cycle(deps: dict[str, set[str]]) -> bool:
    state: dict[str, int] = {}

    def visit(n: str) -> bool:
        if state.get(n) == 1:
            return True
        if state.get(n) == 2:
            return False
        state[n] = 1
        if any(visit(d) for d in deps[n]):
            return True
        state[n] = 2
        return False

    return any(visit(n) for n in deps)


@settings(max_examples=150, deadline=None)
@given(random_plans())
def test_random_plans_compile_by_the_rules(doc: dict[str, Any]) -> None:
    expected = _atomic_deps(doc)
    if _has_cycle(expected):
        with pytest.raises(DependencyCycleError):
            compile_one(doc)
        return
    m = compile_one(doc)
    stage = {t.id: t.stage for t in m.tasks}
    assert sorted(stage) == sorted(expected)  # none lost, none duplicated
    for t in m.tasks:
        assert set(t.depends_on) == expected[t.id]
        assert all(stage[d] < t.stage for d in t.depends_on)  # dependencies sit earlier
        assert t.stage == (1 + max((stage[d] for d in t.depends_on), default=-1))  # longest path
    assert [sorted(s) for s in m.stages] == [
        sorted(i for i, k in stage.items() if k == n) for n in range(len(m.stages))
    ]
    assert compile_one(doc).model_dump_json() == m.model_dump_json()


@settings(max_examples=100, deadline=None)
@given(random_plans(), st.data())
def test_an_injected_cycle_is_rejected_naming_a_real_cycle(doc: dict[str, Any], data: st.DataObject) -> None:
    atomic = sorted(_atomic_deps(doc))
    a = data.draw(st.sampled_from(atomic))
    doc["tasks"].append({"id": "cyc1", "handler": "stub", "depends_on": [a, "cyc2"]})
    doc["tasks"].append({"id": "cyc2", "handler": "stub", "depends_on": ["cyc1"]})
    with pytest.raises(DependencyCycleError) as info:
        compile_one(doc)
    cycle = info.value.cycle
    deps = _atomic_deps(doc)
    assert cycle[0] == cycle[-1]
    for x, y in itertools.pairwise(cycle):
        assert y in deps[x], f"{x} -> {y} is not a dependency"


# ---------------------------------------------------------------- size of the manifests


def _exact(manifests: list[RunManifest]) -> int:
    return sum(len(m.__pydantic_serializer__.to_json(m)) for m in manifests)


def test_the_size_estimate_is_close_to_the_manifests_json() -> None:
    from taskexec.plan import compiler
    from taskexec.plan.compiler import _manifest_bytes  # the estimate the limit is checked on

    seen: list[int] = []

    def spy(*args: Any) -> tuple[int, int]:
        found = _manifest_bytes(*args)
        seen.append(found[0])
        return found

    doc = {
        "variants": {"a": {"x": 1}, "b": {"y": "long" * 10}},
        "tasks": [
            stub("m", params={"p": "v" * 50}, validate=[{"path": "x", "op": ">=", "value": 1}],
                 matrix={"strategy": "cartesian", "params": {"a": list(range(50)), "b": list(range(40))}}),
            stub("n", depends_on=["m"], matrix={"strategy": "cartesian", "params": {"a": list(range(20))}}),
            *(stub(f"t{i}", depends_on=[f"t{i - 1}"] if i else [], params={"i": i}) for i in range(2000)),
        ],
    }  # fmt: skip
    original = compiler._manifest_bytes
    compiler._manifest_bytes = spy  # type: ignore[assignment]
    try:
        manifests = compile_plan(parse_plan(doc), SETTINGS)
    finally:
        compiler._manifest_bytes = original
    assert 0.97 < seen[0] / _exact(manifests) < 1.05


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (
            # 10,000 cases, each depending on the 10,000 cases of `m`: 10^8 dependency ids.
            {"tasks": [
                stub("m", matrix={"strategy": "cartesian", "max_cases": 10_000,
                                  "params": {"a": list(range(100)), "b": list(range(100))}}),
                stub("n", depends_on=["m"], matrix={"strategy": "cartesian", "max_cases": 10_000,
                                                    "params": {"a": list(range(100)), "b": [0] * 100}}),
            ]},
            "20,000 or more tasks per variant, 1 variant(s)",
        ),
        (
            # 200 variants of 1,000 cases with 1 KiB of params each: 200 MB.
            {"variants": {f"v{i}": {"i": i} for i in range(200)},
             "tasks": [stub("m", params={"pad": "x" * 1024},
                            matrix={"strategy": "cartesian", "params": {"a": list(range(1000))}})]},
            "1,000 or more tasks per variant, 200 variant(s)",
        ),
    ],
)  # fmt: skip
def test_manifests_above_the_limit_are_refused_before_they_are_built(doc: dict[str, Any], words: str) -> None:
    import time

    started = time.perf_counter()
    with pytest.raises(PlanError) as info:
        compile_plan(parse_plan(doc), SETTINGS)
    assert time.perf_counter() - started < 5, "refused from an estimate, not after building"
    assert "above the limit of 64 MiB" in str(info.value) and words in str(info.value)
    assert str(info.value).startswith("E001 tasks: ")
