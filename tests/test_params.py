"""Run parameters, templated handler params and artifact paths (issue 16, items 1-3).

The plan side (declarations, overrides, compile-time checks) in plain calls; the worker
side (rendering at claim, inputs selected by path, failures E001) on the in-process
harness: a SQLite store and a recording Celery app, each message's step called by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskexec import TaskStatus, compile_plan, parse_plan
from taskexec.errors import InvalidInputError, PlanError, TaskexecError
from taskexec.models import ErrorCode
from taskexec.plan import templates
from taskexec.plan.params import apply, declare, parse_pairs, read_file, with_params
from taskexec.run import producer
from taskexec.run.dispatch import dispatch
from tests import standin
from tests.standin import Harness

_T = TaskStatus


def compiled(text: str) -> Any:
    [m] = compile_plan(parse_plan(text))
    return m


def errors_of(text: str) -> list[str]:
    with pytest.raises(TaskexecError) as e:
        compile_plan(parse_plan(text))
    return [str(x) for x in e.value.errors] if getattr(e.value, "errors", None) else [str(e.value)]


# ---------------------------------------------------------------- run parameters


def test_declarations_give_types_from_defaults_or_in_full() -> None:
    specs = declare(
        {"model": "gpt-4o", "n": 3, "langs": {"type": "list", "default": ["en"]}, "base": {"type": "string"}}
    )
    assert {k: (s.type, s.default, s.required) for k, s in specs.items()} == {
        "model": ("string", "gpt-4o", False),
        "n": ("int", 3, False),
        "langs": ("list", ["en"], False),
        "base": ("string", None, True),
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"n": {"type": "number"}}, "E001 params.n.type: unknown type 'number'"),
        ({"n": {"type": "int", "default": "x"}}, "E001 params.n.default: must be an int, not 'x'"),
        ({"bad-name": 1}, "E001 params.bad-name: 'bad-name' is not a param name"),
    ],
)
def test_bad_declarations_are_e001_naming_the_param(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as e:
        declare(raw)
    assert str(e.value).startswith(message)


def test_overrides_are_checked_by_name_and_type() -> None:
    specs = declare({"model": "gpt-4o", "n": 3, "ratio": 0.5, "on": True, "base": {"type": "string"}})
    assert apply(specs, {"base": "u", "n": 5, "ratio": 1}) == {
        "model": "gpt-4o",
        "n": 5,
        "ratio": 1.0,
        "on": True,
        "base": "u",
    }
    cases = [
        ({"base": "u", "modle": "x"}, "E001 params.modle: unknown param (did you mean model?)"),
        ({"base": "u", "n": "five"}, "E001 params.n: must be an int, not 'five'"),
        ({"base": "u", "n": True}, "E001 params.n: must be an int, not true"),
        ({"base": "u", "on": 1}, "E001 params.on: must be a bool, not 1"),
        ({}, "E001 params.base: required param not given"),
    ]
    for overrides, message in cases:
        with pytest.raises(PlanError) as e:
            apply(specs, overrides)
        assert str(e.value).startswith(message), str(e.value)


def test_a_plan_without_params_refuses_any() -> None:
    m = compiled("tasks: [{id: a, handler: stub}]")
    assert with_params(m, None) is m
    with pytest.raises(PlanError, match=r"E001 params.x: unknown param; the plan declares none"):
        with_params(m, {"x": 1})


def test_cli_pairs_are_json_or_text_and_strings_stay_text(tmp_path: Path) -> None:
    specs = declare({"version": "1.0", "n": 1})
    assert parse_pairs(["version=1.10", "n=3", "tags=[1, 2]", "name=gpt-4o"], specs) == {
        "version": "1.10",
        "n": 3,
        "tags": [1, 2],
        "name": "gpt-4o",
    }
    with pytest.raises(InvalidInputError, match="E001 --param: 'n' is not NAME=VALUE"):
        parse_pairs(["n"])
    f = tmp_path / "p.yaml"
    f.write_text("n: 4\nmodel: m1\n")
    assert read_file(f) == {"n": 4, "model": "m1"}
    f.write_text("- 1\n")
    with pytest.raises(InvalidInputError, match="must hold an object"):
        read_file(f)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(20)
    )
    f.write_text(bomb)
    with pytest.raises(TaskexecError, match="E001"):
        read_file(f)


def test_the_manifest_keeps_declarations_and_values_and_omits_them_when_none() -> None:
    m = compiled("params: {n: 3}\ntasks: [{id: a, handler: stub}]")
    assert m.param_values == {"n": 3} and m.params["n"].type == "int"
    plain = compiled("tasks: [{id: a, handler: stub}]").model_dump(mode="json")
    assert "params" not in plain and "param_values" not in plain


# ---------------------------------------------------------------- templates


def test_a_lone_expression_keeps_its_type_and_text_renders_to_a_string() -> None:
    context = {"params": {"n": 3, "tags": ["a"]}, "case": {"model": "m1"}, "run": {"id": "r1"}}
    assert templates.render(
        {
            "n": "{{ params.n }}",
            "tags": "{{ params.tags }}",
            "url": "http://h/{{ case.model }}?r={{ run.id }}",
        },
        context,
    ) == {"n": 3, "tags": ["a"], "url": "http://h/m1?r=r1"}


@pytest.mark.parametrize(
    "text",
    [
        "{{ params.__class__ }}",
        "{{ params.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ case.model.__globals__ }}",
    ],
)
def test_the_sandbox_refuses_python_internals(text: str) -> None:
    with pytest.raises(templates.TemplateProblem):
        templates.render({"x": text}, {"params": {"n": 1}, "case": {"model": "m"}})


def test_a_missing_name_is_a_problem_naming_the_param_and_expression() -> None:
    with pytest.raises(templates.TemplateProblem) as e:
        templates.render({"url": "http://h/{{ case.modle }}"}, {"case": {"model": "m"}}, "params")
    assert e.value.where == "params.url" and "case.modle" in e.value.expression
    assert "modle" in e.value.reason


def test_compile_checks_names_declared_params_inputs_and_case_keys() -> None:
    found = errors_of(
        """
params: {n: 3}
tasks:
  - {id: a, handler: stub, output: data}
  - id: b
    handler: stub
    depends_on: [a]
    inputs: [data]
    matrix: {params: {model: [m1, m2]}}
    params:
      delay: "{{ params.nn }}"
      output: {x: "{{ inputs.dta }}", y: "{{ case.modle }}", z: "{{ os.environ }}", w: "{{ oops( }}"}
"""
    )
    text = "\n".join(found)
    assert "tasks[1].params.delay: template '{{ params.nn }}': no params.nn (declared: n)" in text
    assert "tasks[1].params.output.x: template '{{ inputs.dta }}': no inputs.dta (known: data)" in text
    assert "tasks[1].params.output.y: template '{{ case.modle }}': no case.modle (known: model)" in text
    assert "tasks[1].params.output.z: template '{{ os.environ }}': unknown name 'os'" in text
    assert "tasks[1].params.output.w: template '{{ oops( }}'" in text


def test_templated_fields_are_not_judged_by_the_handler_model_at_compile() -> None:
    m = compiled(
        """
params: {base: "http://127.0.0.1:1"}
tasks:
  - {id: a, handler: http, params: {url: "{{ params.base }}/x", timeout: "{{ params.base }}"}}
"""
    )
    assert m.tasks[0].params["url"] == "{{ params.base }}/x"  # compile keeps the template
    assert errors_of("tasks: [{id: a, handler: http, params: {url: ftp://x}}]")  # still judged untemplated


# ---------------------------------------------------------------- artifact paths


def test_input_entries_select_and_rename_and_are_checked_at_compile() -> None:
    m = compiled(
        """
tasks:
  - {id: a, handler: shell, params: {argv: [echo, "{}"], parse_json: true}, output: data}
  - {id: b, handler: stub, depends_on: [a], inputs: [data, {from: data, path: items.0, as: first}]}
"""
    )
    assert m.tasks[1].model_dump(mode="json")["inputs"] == [
        "data",
        {"from": "data", "path": "items.0", "as": "first"},
    ]
    found = "\n".join(
        errors_of(
            """
tasks:
  - {id: a, handler: shell, params: {argv: [echo]}, output: data}
  - {id: b, handler: stub, depends_on: [a], inputs: [{from: dta}, data, data]}
"""
        )
        + errors_of(
            """
tasks:
  - {id: a, handler: shell, params: {argv: [echo]}, output: data}
  - {id: b, handler: stub, depends_on: [a], inputs: [{from: data, path: json.items}]}
"""
        )
    )
    assert (
        "E001 tasks[1].inputs[0].path: 'json' is not in the output of task 'a' "
        "(shell: exit_code, stderr, stdout)" in found
    )
    assert (
        "E001 tasks[1].inputs[0]: artifact 'dta' is not produced by any upstream task (did you mean data?)"
        in found
    )
    assert "E001 tasks[1].inputs[2]: two inputs named 'data'" in found


# ---------------------------------------------------------------- on a worker (in-process)


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    with standin.harness(tmp_path, monkeypatch, ["stub", "python:tests"]) as h:
        yield h


def started(h: Harness, plan: str, params: dict[str, Any] | None = None) -> str:
    m = with_params(standin.manifest(plan, h.svc.settings), params)
    run_id = producer.submit(h.svc, m)
    dispatch(h.svc, run_id, 0)
    return run_id


PIPELINE = """
params: {rows: 2, label: base}
tasks:
  - id: make
    handler: stub
    output: data
    params: {output: {rows: "{{ params.rows }}", items: [{name: x}, {name: y}]}}
  - id: use
    handler: stub
    depends_on: [make]
    matrix: {params: {model: [m1, m2]}}
    inputs: [data, {from: data, path: items.1.name, as: second}]
    params:
      output:
        got: "{{ inputs.second }}"
        rows: "{{ inputs.data.rows * 10 }}"
        tag: "{{ params.label }}-{{ case.model }}-{{ task.id }}-{{ run.id[:6] }}"
"""


def test_params_templates_and_paths_reach_the_handler_and_the_store(harness: Harness) -> None:
    run_id = started(harness, PIPELINE, {"rows": 7})
    harness.execute(run_id, "make")
    harness.advance(run_id, 1)
    for t in ("use[0]", "use[1]"):
        harness.execute(run_id, t)
    rows = harness.tasks(run_id)
    assert rows["make"].output == {"rows": 7, "items": [{"name": "x"}, {"name": "y"}]}
    assert rows["use[1]"].output == {"got": "y", "rows": 70, "tag": f"base-m2-use[1]-{run_id[:6]}"}
    # The store keeps what the handler got (rendered); compile kept the templates.
    assert rows["use[1]"].params is not None and rows["use[1]"].params["output"]["got"] == "y"
    assert rows["make"].params == {"output": {"rows": 7, "items": [{"name": "x"}, {"name": "y"}]}}
    with harness.svc.store.begin() as s:
        from taskexec.store import results

        result = results.run_result(s, run_id)
    assert result.params == {"rows": 7, "label": "base"}
    assert {t.id: t.status for t in result.tasks} == dict.fromkeys(["make", "use[0]", "use[1]"], _T.SUCCEEDED)


def test_a_missing_path_or_name_at_run_time_fails_the_task_e001_without_running_it(harness: Harness) -> None:
    plan = """
tasks:
  - {id: make, handler: "python:tests.handlers:echo", output: data}
  - id: use
    handler: "python:tests.handlers:echo"
    depends_on: [make]
    inputs: [{from: data, path: nothere}]
  - id: tmpl
    handler: "python:tests.handlers:echo"
    depends_on: [make]
    inputs: [data]
    params: {x: "{{ inputs.data.nothere }}"}
"""
    run_id = started(harness, plan)
    harness.execute(run_id, "make")
    harness.advance(run_id, 1)
    harness.execute(run_id, "use")
    harness.execute(run_id, "tmpl")
    rows = harness.tasks(run_id)
    for t in ("use", "tmpl"):
        assert (_T(rows[t].status), rows[t].error_code, rows[t].attempts) == (
            _T.FAILED,
            ErrorCode.VALIDATION.value,
            1,
        )
    assert "task 'use': path 'nothere' is not in the output of task 'make'" in (
        rows["use"].error_message or ""
    )
    assert "tasks[1].inputs[0].path" in (rows["use"].error_message or "")
    assert "task 'tmpl'" in (rows["tmpl"].error_message or "") and "inputs.data.nothere" in (
        rows["tmpl"].error_message or ""
    )
    # echo always succeeds: failed with no output, neither handler ran.
    assert rows["use"].output is None and rows["tmpl"].output is None


def test_compile_lists_the_declared_params() -> None:
    from click.testing import CliRunner

    from taskexec.cli import main

    r = CliRunner().invoke(main, ["compile", "examples/params.yaml"])
    assert r.exit_code == 0, r.output
    assert '  param greeting: string, default "Hello"\n  param repeat: int, default 2\n' in r.output
