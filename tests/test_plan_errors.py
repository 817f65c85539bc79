"""Errors that help (issue 15): every error of a plan at once, the closest known name for a
typo, and the same E001-with-path error for a plan built in code as for a plan file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import taskexec
from taskexec.cli import main
from taskexec.errors import HandlerNotAllowedError, PlanError
from taskexec.plan import compile_plan, parse_plan


def validate(tmp_path: Path, plan: dict[str, object]) -> tuple[int, list[str]]:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    result = CliRunner().invoke(main, ["validate", str(path)])
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def test_validate_shows_every_schema_error_one_line_each(tmp_path: Path) -> None:
    plan = {
        "tasks": [
            {"id": "a", "handler": "stub", "timeout": 0},
            {"id": "b", "handler": "stub", "priority": 42},
            {"id": "c", "handler": "stub", "retry": {"max_attempts": 0}},
        ]
    }
    code, lines = validate(tmp_path, plan)
    assert code == 2
    assert len(lines) == 3, lines
    # The first line is the one validate printed before: the first error, code and path.
    assert lines[0].startswith("taskexec: E001 tasks[0].timeout: ")
    assert lines[1].startswith("taskexec: E001 tasks[1].priority: ")
    assert lines[2].startswith("taskexec: E001 tasks[2].retry.max_attempts: ")


def test_validate_shows_every_unknown_dependency_and_caps_at_fifty(tmp_path: Path) -> None:
    plan = {"tasks": [{"id": f"t{i}", "handler": "stub", "depends_on": [f"missing{i}"]} for i in range(60)]}
    code, lines = validate(tmp_path, plan)
    assert code == 2
    assert lines[0].startswith("taskexec: E001 tasks[0].depends_on[0]: unknown task 'missing0'")
    errors = [line for line in lines if line.startswith("taskexec: E001 tasks[")]
    assert len(errors) == 50
    assert "10 more" in lines[-1]


def test_the_parse_error_lists_the_others() -> None:
    with pytest.raises(PlanError) as info:
        parse_plan({"tasks": [{"id": "a", "handler": "stub", "timeout": 0, "priority": 42}]})
    assert [e.path for e in info.value.errors] == ["tasks[0].timeout", "tasks[0].priority"]
    assert str(info.value).startswith("E001 tasks[0].timeout: ")


@pytest.mark.parametrize(
    ("plan", "path", "hint"),
    [
        (
            {"tasks": [{"id": "a", "handler": "stub"}, {"id": "b", "handler": "stub", "depend_on": ["a"]}]},
            "tasks[1].depend_on",
            "did you mean depends_on?",
        ),
        ({"task": [{"id": "a", "handler": "stub"}]}, "task", "did you mean tasks?"),
        (
            {"tasks": [{"id": "a", "handler": "stub", "retry": {"max_attempt": 2}}]},
            "tasks[0].retry.max_attempt",
            "did you mean max_attempts?",
        ),
        (
            {"defaults": {"timeot": 3}, "tasks": [{"id": "a", "handler": "stub"}]},
            "defaults.timeot",
            "did you mean timeout?",
        ),
    ],
)
def test_an_unknown_key_suggests_the_closest_known_one(plan: dict[str, object], path: str, hint: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(plan)
    [error] = [e for e in info.value.errors if e.path == path]
    assert hint in str(error)


def test_an_unknown_dependency_suggests_the_closest_task_id() -> None:
    plan = parse_plan(
        "tasks: [{id: prepare, handler: stub}, {id: score, handler: stub, depends_on: [prepar]}]"
    )
    with pytest.raises(PlanError) as info:
        compile_plan(plan)
    assert info.value.path == "tasks[1].depends_on[0]"
    assert "unknown task 'prepar'" in str(info.value) and "did you mean prepare?" in str(info.value)


def test_an_unknown_artifact_suggests_the_closest_name() -> None:
    plan = parse_plan(
        "tasks: [{id: a, handler: stub, output: dataset},"
        " {id: b, handler: stub, depends_on: [a], inputs: [datset]}]"
    )
    with pytest.raises(PlanError) as info:
        compile_plan(plan)
    assert info.value.path == "tasks[1].inputs[0]"
    assert "did you mean dataset?" in str(info.value)


def test_an_unknown_handler_suggests_the_closest_allowed_one() -> None:
    plan = parse_plan("tasks: [{id: a, handler: stbu}]")
    with pytest.raises(HandlerNotAllowedError) as info:
        compile_plan(plan)
    assert info.value.path == "tasks[0].handler"
    assert "did you mean stub?" in str(info.value)


def test_a_plan_built_in_code_raises_the_plan_error_with_its_path() -> None:
    with pytest.raises(PlanError) as info:
        taskexec.Plan(tasks=[{"id": "a", "handler": "stub", "timeout": -1}])
    assert str(info.value).startswith("E001 tasks[0].timeout: ")
    with pytest.raises(PlanError) as info:
        taskexec.PlanTask(id="a", handler="stub", depend_on=["x"])
    assert info.value.path == "depend_on" and "did you mean depends_on?" in str(info.value)
    with pytest.raises(PlanError) as info:
        taskexec.Plan(tasks=[])
    assert info.value.path == "tasks"


def test_the_task_model_is_exported_and_builds_plans_in_code() -> None:
    plan = taskexec.Plan(
        tasks=[
            taskexec.PlanTask(id="a", handler="stub"),
            taskexec.PlanTask(id="b", handler="stub", depends_on=["a"]),
        ]
    )
    [m] = taskexec.compile_plan(plan)
    assert m.stages == [["a"], ["b"]]
