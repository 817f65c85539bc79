"""The data contract: statuses, transitions, policies, JSON round trips."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, ValidationError

from taskexec import errors
from taskexec.models import (
    RUN_TRANSITIONS,
    TASK_TRANSITIONS,
    ErrorCode,
    ManifestTask,
    MatrixInfo,
    PathCriterion,
    RateLimit,
    RetryPolicy,
    RunManifest,
    RunResult,
    RunStatistics,
    RunStatus,
    StopConditions,
    TaskResult,
    TaskStatus,
    ValidatorCriterion,
)


def roundtrip(m: BaseModel) -> None:
    assert type(m).model_validate_json(m.model_dump_json()) == m


def test_every_status_has_a_transition_entry() -> None:
    assert set(TASK_TRANSITIONS) == set(TaskStatus)
    assert set(RUN_TRANSITIONS) == set(RunStatus)


@pytest.mark.parametrize("status", list(TaskStatus))
def test_terminal_task_statuses_have_no_way_out(status: TaskStatus) -> None:
    terminal = {"succeeded", "failed", "validation_failed", "timed_out", "error", "cancelled", "skipped"}
    assert status.terminal == (status.value in terminal)


def test_the_documented_task_paths_are_legal() -> None:
    path = ["pending", "queued", "running", "validating", "succeeded"]
    for a, b in itertools.pairwise(path):
        assert TaskStatus(a).can_become(TaskStatus(b))
    assert TaskStatus.RUNNING.can_become(TaskStatus.RETRYING)
    assert TaskStatus.RETRYING.can_become(TaskStatus.QUEUED)
    for s in TaskStatus:
        if not s.terminal:
            assert s.can_become(TaskStatus.CANCELLED), s


def test_illegal_task_transitions() -> None:
    assert not TaskStatus.SUCCEEDED.can_become(TaskStatus.RUNNING)
    assert not TaskStatus.PENDING.can_become(TaskStatus.SUCCEEDED)
    assert not TaskStatus.SKIPPED.can_become(TaskStatus.QUEUED)


def test_run_transitions() -> None:
    assert RunStatus.QUEUED.can_become(RunStatus.RUNNING)
    assert RunStatus.RUNNING.can_become(RunStatus.SUCCEEDED)
    assert RunStatus.ERROR.can_become(RunStatus.RUNNING)  # resume
    assert not RunStatus.SUCCEEDED.can_become(RunStatus.RUNNING)
    assert RunStatus.ERROR.terminal is not False  # error has ended, resume may restart it


def test_error_codes_are_the_documented_ones() -> None:
    assert [c.value for c in ErrorCode] == [f"E{n:03d}" for n in range(1, 14)]


def test_every_error_class_maps_to_one_code() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.TaskexecError)
        assert isinstance(cls.code, ErrorCode)
        assert cls.__doc__ and cls.__doc__.strip().splitlines()[0]


def test_error_message_names_code_and_path() -> None:
    e = errors.PlanError("unknown task 'x'", path="tasks[2].depends_on[0]")
    assert str(e) == "E001 tasks[2].depends_on[0]: unknown task 'x'"
    assert str(errors.DependencyCycleError(["x", "y", "x"])) == "E001: dependency cycle: x -> y -> x"


def test_control_signals_are_apart_from_failures() -> None:
    assert issubclass(errors.RetryableError, errors.ControlSignal)
    assert issubclass(errors.TaskCancelled, errors.ControlSignal)
    assert not issubclass(errors.TaskFailed, errors.ControlSignal)


def test_retry_delay_without_jitter_grows_and_caps() -> None:
    p = RetryPolicy(backoff=1, multiplier=2, max_backoff=5, jitter=False)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_retry_delay_with_full_jitter_stays_in_range() -> None:
    p = RetryPolicy(backoff=1, multiplier=2, max_backoff=60, jitter=True)
    rng = random.Random(1)
    delays = [p.delay(3, rng) for _ in range(200)]
    assert all(0 <= d <= 4 for d in delays)
    assert len(set(delays)) > 100


@pytest.mark.parametrize(
    "bad", [{"max_attempts": 0}, {"backoff": -1}, {"multiplier": 0.5}, {"max_attempts": 3, "surprise": 1}]
)
def test_bad_retry_policies_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RetryPolicy.model_validate(bad)


def test_policies_are_validated() -> None:
    with pytest.raises(ValidationError):
        RateLimit(per_minute=0)
    with pytest.raises(ValidationError):
        StopConditions(max_failures=0)
    with pytest.raises(ValidationError):
        ManifestTask(id="x", stage=0, handler="stub", priority=10)


def sample_manifest() -> RunManifest:
    return RunManifest(
        plan_id="p",
        variant="default",
        stages=[["a"], ["b[0]", "b[1]"]],
        tasks=[
            ManifestTask(
                id="a",
                stage=0,
                handler="shell",
                params={"argv": ["true"]},
                output="data",
                retry=RetryPolicy(max_attempts=1),
            ),
            ManifestTask(
                id="b[0]",
                stage=1,
                depends_on=["a"],
                handler="stub",
                inputs=["data"],
                params={"model": "a", "t": 0.7, "x": None},
                rate_limit="llm",
                priority=9,
                validate=[
                    PathCriterion(path="score", op=">=", value=0.8),
                    ValidatorCriterion(validator="nonempty"),
                ],
            ),
            ManifestTask(id="b[1]", stage=1, depends_on=["a"], handler="stub", inputs=["data"]),
        ],
        rate_limits={"llm": RateLimit(per_minute=120, burst=10, scope="global")},
        stop=StopConditions(max_failures=5, timeout=3600),
        matrices=[MatrixInfo(task="b", strategy="pairwise", cases=2, cartesian=4)],
    )


def test_manifest_round_trips_and_uses_the_contract_keys() -> None:
    m = sample_manifest()
    roundtrip(m)
    data = m.model_dump(mode="json")
    assert list(data)[:4] == ["plan_id", "plan_name", "variant", "stages"]
    assert set(data["tasks"][1]) >= {
        "id",
        "stage",
        "depends_on",
        "handler",
        "params",
        "inputs",
        "output",
        "timeout",
        "retry",
        "rate_limit",
        "priority",
        "validate",
    }
    assert data["tasks"][1]["validate"][0] == {"path": "score", "op": ">=", "value": 0.8}


def test_manifest_stages_must_list_every_task() -> None:
    with pytest.raises(ValidationError, match="stages"):
        RunManifest(plan_id="p", stages=[["a"]], tasks=[])


def test_results_round_trip_and_count() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    tasks = [
        TaskResult(
            id="a",
            status=TaskStatus.SUCCEEDED,
            attempts=1,
            output={"n": 1},
            started_at=now,
            finished_at=now,
            worker="w1",
        ),
        TaskResult(
            id="b",
            status=TaskStatus.FAILED,
            attempts=3,
            error_code=ErrorCode.RETRIES_EXHAUSTED,
            error_message="boom",
        ),
        TaskResult(id="c", status=TaskStatus.SKIPPED, error_code=ErrorCode.UPSTREAM_FAILED),
        TaskResult(id="d", status=TaskStatus.RUNNING, attempts=1),
    ]
    stats = RunStatistics.of(tasks, 1.5)
    assert (stats.total, stats.succeeded, stats.failed, stats.skipped, stats.running, stats.retries) == (
        4,
        1,
        1,
        1,
        1,
        2,
    )
    r = RunResult(
        run_id="r",
        plan_id="p",
        variant="default",
        status=RunStatus.FAILED,
        statistics=stats,
        submitted_at=now,
        tasks=tasks,
        labels={"k": "v"},
        tenant="t",
    )
    roundtrip(r)
    assert r.model_dump(mode="json")["tasks"][0]["output"] == {"n": 1}
