"""``execution: dag`` in-process: upstream counts, release, skip, stop, retry, the reconciler.

The lifecycle on SQLite with the recording app of ``tests/standin.py``: each test plays the
broker by calling the step a message would start. :class:`Broker` delivers every recorded
message in the order simulated durations give, running chord bodies when their parts are
done, so a whole run can be driven in either mode and the two compared.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy import update

import workers.tasks
from taskexec import RunStatus, Settings, TaskStatus
from taskexec.errors import PlanError
from taskexec.metrics.families import FleetMetrics
from taskexec.metrics.listeners import RunDurations
from taskexec.models import ErrorCode
from taskexec.run import producer
from taskexec.run import reconcile as reconciler
from taskexec.run.dispatch import dispatch, release
from taskexec.store import repository as repo
from taskexec.store import results
from taskexec.store.tables import Execution, utcnow
from tests import standin
from tests.standin import Harness
from workers import runner

_T = TaskStatus

DIAMOND = """
tasks:
  - {id: a, handler: stub}
  - {id: slow, handler: stub}
  - {id: b, handler: stub, depends_on: [a]}
  - {id: c, handler: stub, depends_on: [a, slow]}
  - {id: d, handler: stub, depends_on: [b, c]}
"""


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    with standin.harness(tmp_path, monkeypatch, ["stub", "approval", "python:tests"]) as h:
        yield h


def start(h: Harness, plan: str, execution: str = "dag") -> str:
    """Submit a plan in ``execution`` mode and run its first dispatch, as a control worker would."""
    m = standin.manifest(plan, h.svc.settings).model_copy(update={"execution": execution})
    run_id = producer.submit(h.svc, m)
    dispatch(h.svc, run_id, 0)
    return run_id


def blockers(h: Harness, run_id: str) -> dict[str, int]:
    return {t: r.blockers for t, r in h.tasks(run_id).items()}


def sent_for(h: Harness, run_id: str) -> list[str]:
    return h.executed(run_id)


# ---------------------------------------------------------------- release and skip


def test_a_task_goes_when_its_own_upstream_tasks_end_not_its_stage(harness: Harness) -> None:
    run_id = start(harness, DIAMOND)
    assert sorted(sent_for(harness, run_id)) == ["a", "slow"]
    assert blockers(harness, run_id) == {"a": 0, "slow": 0, "b": 1, "c": 2, "d": 2}
    execs = harness.app.named("taskexec.execute")
    assert all(m.kwargs == {"detached": True} and "chord" not in m.options for m in execs)
    harness.execute(run_id, "a", detached=True)
    # b is released at once (slow, in the same stage as a, still queued); c still waits.
    assert sorted(sent_for(harness, run_id)) == ["a", "b", "slow"]
    assert harness.statuses(run_id)["c"] is _T.PENDING
    assert blockers(harness, run_id)["c"] == 1
    assert harness.tasks(run_id)["b"].outbox is None  # sent: out of the outbox
    harness.execute(run_id, "b", detached=True)
    assert harness.statuses(run_id)["d"] is _T.PENDING
    harness.execute(run_id, "slow", detached=True)
    harness.execute(run_id, "c", detached=True)
    harness.execute(run_id, "d", detached=True)
    assert sent_for(harness, run_id).count("d") == 1
    run = harness.run(run_id)
    assert RunStatus(run.status) is RunStatus.SUCCEEDED
    assert run.statistics is not None and run.statistics["succeeded"] == 5


def test_a_duplicated_upstream_settle_never_decrements_twice(harness: Harness) -> None:
    run_id = start(harness, DIAMOND)
    harness.execute(run_id, "a", detached=True)
    assert blockers(harness, run_id)["c"] == 1
    # The same message delivered again, then the settle itself written again (a replayed
    # transaction): the status does not change, so nothing is decremented.
    harness.execute(run_id, "a", detached=True)
    with harness.svc.store.begin() as s:
        again = repo.set_task_status(s, run_id, "a", _T.SUCCEEDED, allowed_from=[_T.RUNNING])
    assert again is None
    release(harness.svc, run_id)
    assert blockers(harness, run_id)["c"] == 1
    assert harness.statuses(run_id)["c"] is _T.PENDING
    assert sent_for(harness, run_id).count("b") == 1
    harness.execute(run_id, "slow", detached=True)
    harness.execute(run_id, "slow", detached=True)  # and a duplicate of the other upstream
    assert blockers(harness, run_id)["c"] == 0
    assert sent_for(harness, run_id).count("c") == 1


def test_a_failure_skips_everything_downstream_at_once(harness: Harness) -> None:
    plan = """
    tasks:
      - {id: bad, handler: stub, params: {behavior: failure}, retry: {max_attempts: 1}}
      - {id: other, handler: stub}
      - {id: child, handler: stub, depends_on: [bad]}
      - {id: grandchild, handler: stub, depends_on: [child, other]}
    """
    run_id = start(harness, plan)
    harness.execute(run_id, "bad", detached=True)
    rows = harness.tasks(run_id)
    # Skipped in the transaction that ended bad, while other (same stage) is still queued.
    assert (rows["child"].status, rows["child"].error_code) == ("skipped", ErrorCode.UPSTREAM_FAILED.value)
    assert rows["grandchild"].status == "skipped"
    assert rows["grandchild"].error_message == "upstream task 'child' ended skipped"
    assert rows["other"].status == "queued"
    assert RunStatus(harness.run(run_id).status) is RunStatus.RUNNING
    harness.execute(run_id, "other", detached=True)
    assert RunStatus(harness.run(run_id).status) is RunStatus.FAILED
    assert "child" not in sent_for(harness, run_id)


def test_max_failures_cancels_what_has_not_started(harness: Harness) -> None:
    plan = """
    stop: {max_failures: 1}
    tasks:
      - {id: bad, handler: stub, params: {behavior: failure}, retry: {max_attempts: 1}}
      - {id: ok, handler: stub}
      - {id: next, handler: stub, depends_on: [ok]}
      - {id: later, handler: stub, depends_on: [next]}
    """
    run_id = start(harness, plan)
    harness.execute(run_id, "ok", detached=True)
    assert harness.statuses(run_id)["next"] is _T.QUEUED
    harness.execute(run_id, "bad", detached=True)
    statuses = harness.statuses(run_id)
    assert (statuses["next"], statuses["later"]) == (_T.CANCELLED, _T.CANCELLED)
    assert RunStatus(harness.run(run_id).status) is RunStatus.FAILED
    harness.execute(run_id, "next", detached=True)  # its message, delivered late, runs nothing
    assert harness.tasks(run_id)["next"].attempts == 0


def test_cancel_stops_a_dag_run_and_a_late_settle_releases_nothing(harness: Harness) -> None:
    run_id = start(harness, DIAMOND)
    assert harness.claim(run_id, "a") == 1  # a worker holds a
    assert producer.cancel(harness.svc, run_id) is RunStatus.RUNNING  # a is still running
    statuses = harness.statuses(run_id)
    assert [statuses[t] for t in ("slow", "b", "c", "d")] == [_T.CANCELLED] * 4
    with harness.svc.store.begin() as s:  # a's outcome arrives after the cancel
        repo.set_task_status(s, run_id, "a", _T.SUCCEEDED, allowed_from=[_T.RUNNING], attempt=1)
    release(harness.svc, run_id)
    assert sorted(sent_for(harness, run_id)) == ["a", "slow"]
    assert RunStatus(harness.run(run_id).status) is RunStatus.CANCELLED


def test_retry_resets_the_counts_of_the_tasks_it_reopens(harness: Harness) -> None:
    plan = """
    tasks:
      - {id: ok, handler: stub}
      - {id: flaky, handler: "python:tests.standin:counted", params: {fail_attempts: 1},
         retry: {max_attempts: 1}}
      - {id: after, handler: stub, depends_on: [ok, flaky]}
      - {id: last, handler: stub, depends_on: [after]}
    """
    run_id = start(harness, plan)
    harness.execute(run_id, "ok", detached=True)
    harness.execute(run_id, "flaky", detached=True)
    assert RunStatus(harness.run(run_id).status) is RunStatus.FAILED
    assert blockers(harness, run_id)["after"] == 0  # both upstream tasks ended (it was skipped)
    reopened = producer.retry_run(harness.svc, run_id)
    assert reopened == ["after", "flaky", "last"]
    assert blockers(harness, run_id) == {"ok": 0, "flaky": 0, "after": 1, "last": 1}
    assert harness.statuses(run_id)["flaky"] is _T.QUEUED
    workers.tasks.release_held(run_id)  # the release retry sends
    assert sent_for(harness, run_id).count("flaky") == 2
    harness.execute(run_id, "flaky", detached=True)
    harness.execute(run_id, "after", detached=True)
    harness.execute(run_id, "last", detached=True)
    assert RunStatus(harness.run(run_id).status) is RunStatus.SUCCEEDED


def test_resume_sends_in_flight_tasks_again_detached(harness: Harness) -> None:
    run_id = start(harness, DIAMOND)
    harness.execute(run_id, "a", detached=True)
    before = len(sent_for(harness, run_id))
    assert producer.resume(harness.svc, run_id) == 2  # slow and b
    again = harness.app.named("taskexec.execute")[before:]
    assert sorted(m.args[1] for m in again) == ["b", "slow"]
    assert all(m.kwargs == {"detached": True} and "chord" not in m.options for m in again)


# ---------------------------------------------------------------- the outbox and the reconciler


def test_a_released_task_never_sent_is_sent_by_the_reconciler(harness: Harness) -> None:
    run_id = start(harness, DIAMOND)
    assert harness.claim(run_id, "a") == 1
    # The worker stores a's outcome and dies before it publishes what a released.
    with harness.svc.store.begin() as s:
        repo.set_task_status(s, run_id, "a", _T.SUCCEEDED, allowed_from=[_T.RUNNING], attempt=1)
    row = harness.tasks(run_id)["b"]
    assert (row.status, (row.outbox or "")[:2]) == ("queued", repo.READY)
    assert "b" not in sent_for(harness, run_id)
    reconciler.reconcile(harness.svc, grace=60)  # within the grace: left to its publisher
    assert "b" not in sent_for(harness, run_id)
    with harness.svc.store.begin() as s:
        s.execute(update(Execution).values(updated_at=utcnow() - timedelta(seconds=120)))
    report = reconciler.reconcile(harness.svc, grace=60)
    assert f"{run_id}/b" in report.requeued
    [copy] = [m for m in harness.app.named("taskexec.execute") if m.args[1] == "b"]
    assert copy.kwargs == {"detached": True}
    assert harness.tasks(run_id)["b"].outbox is None


def test_the_reconciler_ends_a_run_whose_last_settle_did_not(harness: Harness) -> None:
    run_id = start(harness, "tasks: [{id: a, handler: stub}, {id: b, handler: stub, depends_on: [a]}]")
    harness.execute(run_id, "a", detached=True)
    assert harness.claim(run_id, "b") == 1
    with harness.svc.store.begin() as s:  # b ends; its worker dies before it ends the run
        repo.set_task_status(s, run_id, "b", _T.SUCCEEDED, allowed_from=[_T.RUNNING], attempt=1)
    assert RunStatus(harness.run(run_id).status) is RunStatus.RUNNING
    reconciler.reconcile(harness.svc, grace=60)
    assert RunStatus(harness.run(run_id).status) is RunStatus.SUCCEEDED


def test_an_approval_holds_its_dependants_and_its_decision_releases_them(harness: Harness) -> None:
    plan = """
    tasks:
      - {id: gate, handler: approval}
      - {id: free, handler: stub}
      - {id: after, handler: stub, depends_on: [gate]}
    """
    run_id = start(harness, plan)
    assert harness.execute(run_id, "gate", detached=True).record["status"] == "waiting_approval"
    harness.execute(run_id, "free", detached=True)
    assert harness.statuses(run_id)["after"] is _T.PENDING
    assert RunStatus(harness.run(run_id).status) is RunStatus.RUNNING
    producer.decide(harness.svc, run_id, "gate", approve=True, by="me")
    workers.tasks.release_held(run_id)
    assert "after" in sent_for(harness, run_id)
    harness.execute(run_id, "after", detached=True)
    assert RunStatus(harness.run(run_id).status) is RunStatus.SUCCEEDED


# ---------------------------------------------------------------- both modes, random DAGs


class Broker:
    """Delivers a harness's recorded messages in simulated time: each execute takes its
    task's duration, control steps none; a chord's body goes when its parts are done."""

    def __init__(self, h: Harness, durations: dict[str, float]) -> None:
        self.h, self.durations = h, durations
        self.seen = 0
        self.now = 0.0
        self.queue: list[tuple[float, int, int]] = []  # (due, seq, index into app.sent)
        self.parts: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def _take_new(self) -> None:
        sent = self.h.app.sent
        while self.seen < len(sent):
            m = sent[self.seen]
            took = self.durations.get(m.args[1], 0.0) if m.name == "taskexec.execute" else 0.0
            if "chord" in m.options:
                gid = m.options["group_id"]
                self.parts[gid] = self.parts.get(gid, 0) + 1
            heapq.heappush(self.queue, (self.now + took, self.seen, self.seen))
            self.seen += 1

    def run(self, limit: int = 10_000) -> None:
        self._take_new()
        for _ in range(limit):
            if not self.queue:
                return
            self.now, _, k = heapq.heappop(self.queue)
            m = self.h.app.sent[k]
            self._deliver(m.name, m.args, m.kwargs)
            gid = m.options.get("group_id")
            if "chord" in m.options and gid is not None:
                self.done[gid] = self.done.get(gid, 0) + 1
                if self.done[gid] == self.parts[gid]:
                    body = m.options["chord"]
                    self._deliver(body["task"], tuple(body["args"]), {})
            self._take_new()
        raise AssertionError("the run did not end")

    def _deliver(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        svc = self.h.svc
        if name == "taskexec.execute":
            out = runner.execute(self.h.rt, args[0], args[1], detached=bool(kwargs.get("detached")))
            assert out.again_in is None, out
        elif name == "taskexec.advance":
            workers.tasks.advance(*args)
        elif name == "taskexec.release":
            release(svc, args[0])
        elif name == "taskexec.dispatch":
            dispatch(svc, args[0], args[1])


def _plan(deps: list[list[int]], fails: list[bool]) -> str:
    tasks = []
    for i, (up, bad) in enumerate(zip(deps, fails, strict=True)):
        task: dict[str, Any] = {"id": f"t{i}", "handler": "stub", "retry": {"max_attempts": 1}}
        if up:
            task["depends_on"] = [f"t{j}" for j in up]
        if bad:
            task["params"] = {"behavior": "failure"}
        tasks.append(task)
    return json.dumps({"tasks": tasks})


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[list[int]], list[bool], list[float]]:
    n = draw(st.integers(1, 9))
    deps = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=min(3, i)))) if i else [] for i in range(n)]
    fails = draw(st.lists(st.sampled_from([False, False, False, True]), min_size=n, max_size=n))
    durations = draw(st.lists(st.floats(0.05, 2.0), min_size=n, max_size=n))
    return deps, fails, durations


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dag=dags())
def test_random_dags_end_alike_in_both_modes_and_no_task_starts_before_its_upstreams(
    tmp_path_factory: pytest.TempPathFactory, dag: tuple[list[list[int]], list[bool], list[float]]
) -> None:
    deps, fails, durations = dag
    plan = _plan(deps, fails)
    took = {f"t{i}": d for i, d in enumerate(durations)}
    ended: dict[str, Any] = {}
    tmp = tmp_path_factory.mktemp("dag")
    with pytest.MonkeyPatch.context() as mp, standin.harness(tmp, mp, ["stub"]) as h:
        for mode in ("stages", "dag"):
            run_id = start(h, plan, mode)
            Broker(h, took).run()
            rows = h.tasks(run_id)
            ended[mode] = (h.run(run_id).status, {t: (r.status, r.error_code) for t, r in rows.items()})
            assert all(r.attempts <= 1 for r in rows.values())
            for i, up in enumerate(deps):
                row = rows[f"t{i}"]
                if row.started_at is None:
                    continue
                for j in up:
                    upstream = rows[f"t{j}"]
                    assert upstream.status == "succeeded"
                    assert upstream.finished_at is not None and upstream.finished_at <= row.started_at
            h.app.sent.clear()
    assert ended["dag"] == ended["stages"]
    assert ended["dag"][0] in ("succeeded", "failed")


# ---------------------------------------------------------------- metrics


class _Reader:
    """What :class:`RunDurations` reads through a client: a run's result and the store."""

    def __init__(self, h: Harness) -> None:
        self.store = h.svc.store

    def status(self, run_id: str) -> Any:
        with self.store.begin() as s:
            return results.run_result(s, run_id)


def test_an_ended_dag_run_observes_its_edge_latencies(harness: Harness) -> None:
    registry = CollectorRegistry()
    durations = RunDurations(FleetMetrics(registry), None)
    durations.client = _Reader(harness)  # type: ignore[assignment]
    run_id = start(harness, DIAMOND)
    for task in ("a", "slow", "b", "c", "d"):
        harness.execute(run_id, task, detached=True)
    durations._read(run_id, "succeeded", None)
    # b, c and d each started after their last upstream task ended: three edges observed.
    assert registry.get_sample_value("taskexec_edge_latency_seconds_count") == 3
    assert registry.get_sample_value("taskexec_run_duration_seconds_count", {"status": "succeeded"}) == 1
    stages_run = start(harness, DIAMOND, "stages")
    durations._read(stages_run, "running", None)
    assert registry.get_sample_value("taskexec_edge_latency_seconds_count") == 3  # stages: none
    durations.pool.shutdown()


# ---------------------------------------------------------------- the plan's field


def test_execution_is_read_from_the_plan_or_its_defaults_and_recorded_in_the_manifest() -> None:
    settings = Settings()
    one = "tasks: [{id: a, handler: stub}]\n"
    assert standin.manifest(one, settings).execution == "stages"
    assert standin.manifest("execution: dag\n" + one, settings).execution == "dag"
    assert standin.manifest("defaults: {execution: dag}\n" + one, settings).execution == "dag"
    assert '"execution":"dag"' in standin.manifest("execution: dag\n" + one, settings).model_dump_json()
    with pytest.raises(PlanError, match="set execution once") as caught:
        standin.manifest("execution: dag\ndefaults: {execution: stages}\n" + one, settings)
    assert caught.value.code == "E001"
    with pytest.raises(PlanError, match="'stages' or 'dag'"):
        standin.manifest("execution: fast\n" + one, settings)
