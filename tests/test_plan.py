"""Plan loading: YAML or JSON by content, a strict schema, precise errors, hostile input."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskexec.errors import PlanError
from taskexec.plan import MAX_ALIAS_EXPANSION, MAX_PLAN_BYTES, MAX_PLAN_DEPTH, load_plan, parse_plan


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


# ---------------------------------------------------------------- hostile structure


def billion_laughs(levels: int = 9) -> str:
    """A plan whose params hold nested YAML aliases: 445 bytes standing for 9^9 strings."""
    lines = ["tasks:", "  - id: lol", "    handler: stub", "    params:"]
    lines.append('      a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
    for prev, name in itertools.pairwise("abcdefghi"[:levels]):
        lines.append(f"      {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once_without_growing(tmp_path: Path) -> None:
    bomb = write(tmp_path, "bomb.yaml", billion_laughs())
    assert bomb.stat().st_size < 450
    started = time.perf_counter()
    with pytest.raises(PlanError) as info:
        load_plan(bomb)
    spent = time.perf_counter() - started
    assert str(info.value) == (
        f"E001 {bomb}: YAML aliases expand the plan by more than 10 MiB "
        "(the limit; nested aliases, a 'billion laughs', are refused)"
    )
    tracemalloc.start()  # what parsing allocates (load_plan's read buffer is MAX_PLAN_BYTES)
    try:
        with pytest.raises(PlanError):
            parse_plan(bomb.read_text())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert spent < 0.1 and peak < 1024 * 1024, (spent, peak)
    assert MAX_ALIAS_EXPANSION == MAX_PLAN_BYTES


def test_aliases_within_the_limit_load_as_shared_values() -> None:
    # What yaml.dump writes for a generated plan whose tasks share one retry policy.
    retry = {"max_attempts": 3, "backoff": 0.5}
    doc = {"tasks": [{"id": f"t{i}", "handler": "stub", "retry": retry} for i in range(2000)]}
    text = yaml.dump(doc)
    assert text.count("*id001") == 1999
    plan = parse_plan(text)
    assert len(plan.tasks) == 2000 and plan.tasks[-1].retry is not None
    assert parse_plan(billion_laughs(levels=5)).tasks[0].params["e"][0][0][0][0] == ["lol"] * 9


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(PlanError, match=r"the alias \*a is inside its own anchor"):
        parse_plan("tasks:\n  - id: x\n    handler: stub\n    params: &a {self: *a}\n")


def nested(depth: int, as_json: bool) -> str:
    """A plan whose lists and mappings nest ``depth`` levels deep in all (3 above the params)."""
    inner = "[" * (depth - 4) + "]" * (depth - 4)
    if as_json:
        return '{"tasks": [{"id": "x", "handler": "stub", "params": {"p": ' + inner + "}}]}"
    return "tasks:\n  - id: x\n    handler: stub\n    params:\n      p: " + inner + "\n"


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "yaml"])
def test_nesting_is_bounded_with_a_clear_error(as_json: bool) -> None:
    assert parse_plan(nested(MAX_PLAN_DEPTH, as_json)).tasks[0].id == "x"
    for depth in (MAX_PLAN_DEPTH + 1, 500, 1000, 100_000):
        started = time.perf_counter()
        with pytest.raises(PlanError) as info:
            parse_plan(nested(depth, as_json), origin="deep.plan")
        assert str(info.value) == (
            "E001 deep.plan: the plan nests lists and mappings more than 100 levels deep (the limit)"
        )
        assert time.perf_counter() - started < 0.5


def test_brackets_inside_json_strings_do_not_count_as_nesting() -> None:
    text = json.dumps(
        {"tasks": [{"id": "x", "handler": "stub", "params": {"s": "[" * 500, "t": '\\"{' * 300}}]}
    )
    assert parse_plan(text).tasks[0].params["s"] == "[" * 500


def test_deep_json_and_alias_bombs_through_the_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from taskexec.cli import main

    runner = CliRunner()
    deep = write(tmp_path, "deep.json", "[" * 1000 + "]" * 1000)
    bomb = write(tmp_path, "bomb.yaml", billion_laughs())
    for path, words in ((deep, "100 levels deep"), (bomb, "billion laughs")):
        result = runner.invoke(main, ["validate", str(path)])
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
