"""Plan loading: YAML or JSON by content, a strict schema, precise errors, hostile input."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskexec.errors import PlanError
from taskexec.plan import MAX_PLAN_BYTES, load_plan, parse_plan


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def test_yaml_and_json_by_content_not_suffix(tmp_path: Path) -> None:
    doc = {"id": "p", "tasks": [{"id": "a", "handler": "stub"}]}
    as_json = load_plan(write(tmp_path, "plan.yaml", json.dumps(doc)))
    as_yaml = load_plan(write(tmp_path, "plan.json", "id: p\ntasks:\n  - {id: a, handler: stub}\n"))
    assert as_json == as_yaml


def test_the_design_example_loads() -> None:
    text = """
id: nightly-eval
name: Nightly evaluation
defaults:
  timeout: 60
  retry: {max_attempts: 3, backoff: 1.0, multiplier: 2.0, max_backoff: 60, jitter: true}
  priority: 5
rate_limits:
  llm: {per_minute: 120, burst: 10}
stop: {max_failures: 5, timeout: 3600}
variants:
  baseline: {}
  new-prompt: {prompt: v2}
tasks:
  - id: prepare
    handler: shell
    params: {argv: [python, -c, "print('ok')"]}
    output: dataset
  - id: evaluate
    depends_on: [prepare]
    tasks:
      - id: score
        handler: stub
        inputs: [dataset]
        rate_limit: llm
        params: {delay: 0.1}
        matrix:
          strategy: pairwise
          max_cases: 100
          params: {model: [a, b, c], temperature: [0, 0.7], lang: [en, zh, fr]}
        validate:
          - {path: score, op: ">=", value: 0.8}
  - id: report
    depends_on: [evaluate]
    handler: stub
"""
    plan = parse_plan(text)
    assert plan.plan_id == "nightly-eval"
    assert plan.tasks[1].tasks is not None
    assert plan.tasks[1].tasks[0].criteria[0].op == ">="  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("doc", "path", "words"),
    [
        ({"tasks": [{"id": "a", "handler": "stub", "colour": "red"}]}, "tasks[0].colour", "unknown field"),
        ({"tasks": [{"id": "a", "handler": "stub", "timeout": -5}]}, "tasks[0].timeout", "greater than 0"),
        ({"tasks": [{"id": "a", "handler": "stub", "priority": 12}]}, "tasks[0].priority", "less than"),
        (
            {"tasks": [{"id": "a", "tasks": [{"id": "b", "handler": "stub", "retry": {"max_attempts": 0}}]}]},
            "tasks[0].tasks[0].retry.max_attempts",
            "greater than",
        ),
        ({"tasks": [{"handler": "stub"}]}, "tasks[0].id", "required"),
        ({"tasks": [{"id": "a b", "handler": "stub"}]}, "tasks[0].id", "not a valid id"),
        ({"tasks": [{"id": "a[0]", "handler": "stub"}]}, "tasks[0].id", "not a valid id"),
        ({"tasks": []}, "tasks", "at least 1"),
        (
            {"tasks": [{"id": "a", "handler": "stub", "validate": [{"path": "x", "op": "~"}]}]},
            "tasks[0].validate[0].op",
            "input should be",
        ),
        (
            {"tasks": [{"id": "a", "handler": "stub", "validate": [{"op": ">"}]}]},
            "tasks[0].validate[0].path",
            "required",
        ),
        (
            {"rate_limits": {"llm": {"per_minute": 0}}, "tasks": [{"id": "a", "handler": "stub"}]},
            "rate_limits.llm.per_minute",
            "greater than 0",
        ),
        ({"nope": 1, "tasks": [{"id": "a", "handler": "stub"}]}, "nope", "unknown field"),
    ],
)
def test_schema_errors_name_the_field(doc: dict[str, object], path: str, words: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(doc)
    assert info.value.path == path
    assert words in info.value.message.lower()
    assert str(info.value).startswith(f"E001 {path}: ")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("", "empty"),
        ("   \n\n", "empty"),
        ("tasks: [unclosed\n  - {id: ", "invalid yaml at line"),
        ('{"tasks": [', "invalid json at line"),
        ("- just\n- a list\n", "not list"),
        ("42", "not int"),
        (b"\x00\x01\x02binary", "binary"),
        (b"\xff\xfe\xfa junk", "not utf-8"),
    ],
)
def test_bad_files_are_one_clear_error(tmp_path: Path, content: str | bytes, words: str) -> None:
    with pytest.raises(PlanError) as info:
        load_plan(write(tmp_path, "p.yaml", content))
    assert words in str(info.value).lower()
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no such plan file"):
        load_plan(tmp_path / "nope.yaml")
    with pytest.raises(PlanError, match="directory"):
        load_plan(tmp_path)


def test_a_huge_file_is_refused_before_parsing(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    with p.open("w") as f:
        f.write("tasks:\n")
        line = "  - {id: t, handler: stub, params: {pad: " + "x" * 1000 + "}}\n"
        while f.tell() <= 50 * 1024 * 1024:
            f.write(line)
    with pytest.raises(PlanError, match="larger than"):
        load_plan(p)
    assert MAX_PLAN_BYTES < 50 * 1024 * 1024


def test_plan_id_from_name_or_file(tmp_path: Path) -> None:
    assert parse_plan({"name": "Nightly Eval!", "tasks": [{"id": "a", "handler": "stub"}]}).plan_id == (
        "nightly-eval"
    )
    assert load_plan(write(tmp_path, "my plan.yaml", "tasks: [{id: a, handler: stub}]")).plan_id == "my-plan"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_the_loader_only_ever_raises_its_own_error(
    tmp_path_factory: pytest.TempPathFactory, data: str | bytes
) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    with contextlib.suppress(PlanError):
        load_plan(p)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "tasks", "defaults", "stop", "variants", "x"]), json_values, max_size=4
    )
)
def test_structured_junk_only_raises_plan_errors(doc: dict[str, object]) -> None:
    with contextlib.suppress(PlanError):
        parse_plan(doc)


def test_ten_thousand_random_and_mutated_inputs_only_raise_plan_errors() -> None:
    """Random bytes and byte-level mutations of a valid plan: a clear error or a plan, nothing else."""
    import random

    rng = random.Random(20261125)
    valid = (
        b"id: p\ndefaults: {timeout: 5, retry: {max_attempts: 2}}\n"
        b"tasks:\n  - {id: a, handler: stub, output: d}\n  - id: g\n    depends_on: [a]\n"
        b"    tasks: [{id: b, handler: stub, inputs: [d], matrix: {params: {x: [1, 2]}}}]\n"
    )
    outcomes = {"plan": 0, "error": 0}
    for i in range(10_000):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        else:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(len(data))
                data[pos : pos + rng.randrange(0, 4)] = bytes(
                    rng.randrange(32, 127) for _ in range(rng.randrange(4))
                )
            data = bytes(data)
        try:
            parse_plan(data.decode("utf-8", "replace"))
            outcomes["plan"] += 1
        except PlanError as e:
            assert "\n" not in str(e) and str(e).startswith("E001")
            outcomes["error"] += 1
    assert outcomes["plan"] > 0 and outcomes["error"] > 5_000
