"""The public surface: everything public in `taskexec` is in `__all__`, and only that."""

from __future__ import annotations

import types

import taskexec


def test_all_and_the_namespace_match() -> None:
    # dir(): the names loaded on first use (taskexec.__getattr__) count before their first use.
    public = {
        name
        for name in dir(taskexec)
        if not name.startswith("_") and not isinstance(getattr(taskexec, name), types.ModuleType)
    }
    assert public == set(taskexec.__all__)
    assert len(taskexec.__all__) == len(set(taskexec.__all__)), "a name is listed twice"


def test_every_export_is_documented() -> None:
    for name in taskexec.__all__:
        doc = getattr(taskexec, name).__doc__
        assert doc and doc.strip(), f"{name} has no docstring"


def test_the_task_model_for_plans_built_in_code_is_exported() -> None:
    """Issue 15: ``taskexec.Plan(tasks=[taskexec.PlanTask(...)])`` builds a plan in code."""
    assert "PlanTask" in taskexec.__all__
    assert taskexec.PlanTask is taskexec.plan.PlanTask


def test_the_error_a_wait_raises_is_exported() -> None:
    assert taskexec.WaitTimeoutError.__module__ == "taskexec.errors"
    assert issubclass(taskexec.WaitTimeoutError, taskexec.TaskexecError)
    assert issubclass(taskexec.WaitTimeoutError, TimeoutError)
