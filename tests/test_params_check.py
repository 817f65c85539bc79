"""``validate``/``compile`` check every task's params against its handler's model (issue 15,
defect 8): after matrix and variant merges, with the field path, secrets accepted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from taskexec.errors import PlanError, TaskexecError
from taskexec.models import RunManifest
from taskexec.plan import parse_plan
from taskexec.plan.compiler import compile_plan
from taskexec.settings import Settings

SETTINGS = Settings(allowed_handlers="shell,http,stub,approval,python:tests")


def compiled(text: str) -> list[RunManifest]:
    return compile_plan(parse_plan(textwrap.dedent(text)), SETTINGS)


def lines(text: str) -> list[str]:
    with pytest.raises(TaskexecError) as info:
        compiled(text)
    assert isinstance(info.value, PlanError) and info.value.code.value == "E001"
    return [e.line() for e in info.value.errors]


def test_the_issues_three_plans_are_refused_with_the_field_path() -> None:
    assert lines("tasks: [{id: a, handler: shell, params: {argv: [sleep, 10]}}]") == [
        "E001 tasks[0].params.argv[1]: Input should be a valid string"
    ]
    assert lines("tasks: [{id: a, handler: shell, params: {argv: echo hi}}]") == [
        "E001 tasks[0].params.argv: Input should be a valid list"
    ]
    assert lines("tasks: [{id: a, handler: shell, params: {args: [echo, hi]}}]") == [
        "E001 tasks[0].params.argv: Field required (did you mean 'argv' for 'args'?)"
    ]


def test_every_bad_task_is_reported_in_nested_groups() -> None:
    found = lines(
        """
        tasks:
          - id: g
            tasks:
              - {id: a, handler: stub, params: {delay: soon}}
              - {id: b, handler: http, params: {url: "ftp://x", timeout: 0}}
          - {id: c, handler: approval, params: {timeout: -1}}
          - {id: fine, handler: stub, params: {delay: 1, anything: [1, 2]}}
        """
    )
    assert found[0].startswith("E001 tasks[0].tasks[0].params.delay: Input should be a valid number")
    assert found[1] == "E001 tasks[0].tasks[1].params.url: String should match pattern '^https?://'"
    assert found[2] == "E001 tasks[0].tasks[1].params.timeout: Input should be greater than 0"
    assert found[3] == "E001 tasks[1].params.timeout: Input should be greater than 0"
    assert len(found) == 4


def test_params_are_checked_after_matrix_and_variant_merges() -> None:
    matrix = lines(
        """
        tasks:
          - id: m
            handler: shell
            params: {argv: [echo]}
            matrix: {params: {timeout: [5, later]}}
        """
    )
    assert matrix == ["E001 tasks[0].params.timeout: Input should be a valid number, "
                      "unable to parse string as a number (matrix case m[1])"]  # fmt: skip
    variant = lines(
        """
        tasks: [{id: a, handler: shell, params: {argv: [echo]}}, {id: b, handler: stub}]
        variants: {good: {}, bad: {parse_json: maybe}}
        """
    )
    assert variant == ["E001 tasks[0].params.parse_json: Input should be a valid boolean, "
                       "unable to interpret input (variant bad)"]  # fmt: skip
    # A variant may mend what the plan leaves out.
    assert compiled("tasks: [{id: a, handler: shell}]\nvariants: {v: {argv: [echo, hi]}}")


def test_secrets_are_accepted_where_a_value_is_expected() -> None:
    assert compiled(
        """
        tasks:
          - id: a
            handler: shell
            params: {argv: [curl, {secret: API_URL}], env: {TOKEN: {secret: API_TOKEN}}}
          - {id: b, handler: http, params: {url: {secret: HOOK_URL}, timeout: {secret: HOOK_TIMEOUT}}}
          - {id: c, handler: http, params: {url: HOOK_URL}, secret_params: [url]}
        """
    )


def test_handlers_without_a_model_are_not_checked() -> None:
    assert compiled("tasks: [{id: a, handler: 'python:tests.standin:counted', params: {argv: 1}}]")


def test_validate_lists_params_errors(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("tasks: [{id: a, handler: shell, params: {argv: [sleep, 10]}}]\n")
    env = {**os.environ, "TASKEXEC_ALLOWED_HANDLERS": "shell"}
    done = subprocess.run(
        [sys.executable, "-m", "taskexec", "validate", str(plan)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    assert "E001 tasks[0].params.argv[1]: Input should be a valid string" in done.stdout + done.stderr


def test_distinct_params_are_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import taskexec.handlers

    calls: list[Any] = []
    real = taskexec.handlers.params_errors
    monkeypatch.setattr(taskexec.handlers, "params_errors", lambda m, p: calls.append(p) or real(m, p))
    doc = "tasks:\n" + "".join(f"  - {{id: t{i}, handler: stub, params: {{i: {i}}}}}\n" for i in range(500))
    compile_plan(parse_plan(doc), SETTINGS)
    assert len(calls) == 1, "the params stub reads are the same for every task"
