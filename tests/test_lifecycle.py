"""The run lifecycle in-process: a SQLite store, a recording Celery app, no Redis, no workers.

What the producer, the control steps and one worker's attempts do to the store's rows, and
what they would send (``tests/standin.py`` records it). Messages are never delivered: each
test plays the broker's part by calling the step a message would start.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, update

from taskexec import RunStatus, TaskStatus
from taskexec.errors import BrokerUnavailableError
from taskexec.models import ErrorCode
from taskexec.run import producer
from taskexec.run import reconcile as reconciler
from taskexec.run.dispatch import dispatch, release, resend
from taskexec.run.lifecycle import abandon, finalize, stage_settled
from taskexec.run.messages import message_id
from taskexec.store import repository as repo
from taskexec.store.tables import Run, utcnow
from tests import standin
from tests.standin import Harness
from workers.attempt import Attempt

_T = TaskStatus
check_broker = producer.check_broker  # the real one (the fixture stands it in)

TWO_STAGES = """
tasks:
  - {id: a, handler: stub}
  - {id: b, handler: stub}
  - {id: c, handler: stub, depends_on: [a, b]}
"""


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    with standin.harness(tmp_path, monkeypatch, ["stub", "python:tests"]) as h:
        yield h


# ---------------------------------------------------------------- 1. submit


def test_submit_stores_a_queued_run_and_records_its_first_dispatch(harness: Harness) -> None:
    run_id = harness.submit(TWO_STAGES)
    run = harness.run(run_id)
    assert (RunStatus(run.status), run.stage_cursor, run.epoch, run.stage_count) == (
        RunStatus.QUEUED,
        -1,
        0,
        2,
    )
    rows = harness.tasks(run_id)
    assert {t: (r.status, r.attempts, r.stage) for t, r in rows.items()} == {
        "a": ("pending", 0, 0),
        "b": ("pending", 0, 0),
        "c": ("pending", 0, 1),
    }
    # One small message to a control worker, no task message: the chord is built there.
    [sent] = harness.app.sent
    assert (sent.name, sent.args, sent.options["queue"]) == ("taskexec.dispatch", (run_id, 0), "control")


def test_submit_without_redis_refuses_before_writing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(producer, "check_broker", check_broker)
    with pytest.raises(BrokerUnavailableError):
        harness.submit(TWO_STAGES)
    with harness.svc.store.begin() as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 0
    assert harness.app.sent == []


# ---------------------------------------------------------------- 2. dispatch and stage advance


def test_dispatch_queues_the_stage_and_records_one_chord(harness: Harness) -> None:
    run_id = harness.submit(TWO_STAGES)
    harness.app.sent.clear()
    dispatch(harness.svc, run_id, 0)
    rows = harness.tasks(run_id)
    assert {t: r.status for t, r in rows.items()} == {"a": "queued", "b": "queued", "c": "pending"}
    assert all(rows[t].outbox is None for t in "ab")  # the broker took them: out of the outbox
    run = harness.run(run_id)
    assert (RunStatus(run.status), run.stage_cursor) == (RunStatus.RUNNING, 0)
    assert run.broker_instance == harness.app.broker_instance()
    execs = harness.app.named("taskexec.execute")
    assert sorted(m.task_id for m in execs) == sorted(message_id(run_id, t, 0) for t in "ab")
    assert {m.options["queue"] for m in execs} == {"executor"}
    # One chord: one group, whose body advances the run to stage 1 once it completes.
    assert len({m.options["group_id"] for m in execs}) == 1
    bodies = {(m.options["chord"]["task"], tuple(m.options["chord"]["args"])) for m in execs}
    assert bodies == {("taskexec.advance", (run_id, 1))}
    assert len(harness.app.sent) == 2


def test_a_stage_is_dispatched_once_however_often_asked(harness: Harness) -> None:
    run_id = harness.started(TWO_STAGES)
    sent = len(harness.app.sent)
    dispatch(harness.svc, run_id, 0)  # a redelivered dispatch message
    assert len(harness.app.sent) == sent
    assert harness.run(run_id).stage_cursor == 0


def test_the_next_stage_waits_until_the_stage_settles(harness: Harness) -> None:
    run_id = harness.started(TWO_STAGES)
    assert harness.execute(run_id, "a").record["status"] == "succeeded"
    with harness.svc.store.begin() as s:
        assert not stage_settled(s, run_id, 0)  # b is still queued
    harness.advance(run_id, 1)  # a chord body that ran early
    release(harness.svc, run_id)
    assert harness.statuses(run_id)["c"] is _T.PENDING
    assert harness.run(run_id).stage_cursor == 0
    assert harness.executed(run_id) == ["a", "b"]

    assert harness.execute(run_id, "b").record["status"] == "succeeded"
    harness.advance(run_id, 1)
    assert harness.statuses(run_id)["c"] is _T.QUEUED
    assert harness.run(run_id).stage_cursor == 1
    assert harness.executed(run_id) == ["a", "b", "c"]
    [last] = harness.app.named("taskexec.execute")[2:]
    assert (last.options["chord"]["task"], tuple(last.options["chord"]["args"])) == (
        "taskexec.advance",
        (run_id, 2),
    )


def test_a_broker_that_refuses_leaves_the_tasks_in_the_outbox_and_the_run_going(harness: Harness) -> None:
    run_id = harness.submit(TWO_STAGES)
    harness.app.sent.clear()
    harness.app.refuse = True
    dispatch(harness.svc, run_id, 0)
    rows = harness.tasks(run_id)
    assert {t: r.status for t, r in rows.items()} == {"a": "queued", "b": "queued", "c": "pending"}
    assert rows["a"].outbox is not None and rows["a"].outbox == rows["b"].outbox  # the reconciler's cue
    run = harness.run(run_id)
    assert RunStatus(run.status) is RunStatus.RUNNING
    assert run.error_message and "not sent" in run.error_message  # an incident, not the run's end
    assert harness.app.sent == []

    # The reconciler, past the grace period, finds them in the outbox and sends them.
    harness.app.refuse = False
    with harness.svc.store.begin() as s:
        overdue = repo.overdue_tasks(s, now=utcnow(), late=utcnow() + timedelta(seconds=1))
    assert sorted(o.task_id for o in overdue) == ["a", "b"]
    assert resend(harness.svc, run_id, overdue) == 2
    execs = harness.app.named("taskexec.execute")
    assert sorted(m.args[1] for m in execs) == ["a", "b"]
    assert all(m.task_id.startswith(message_id(run_id, m.args[1], 0) + ".") for m in execs)
    assert {m.options["chord"]["task"] for m in execs} == {"taskexec.release"}
    rows = harness.tasks(run_id)
    assert (rows["a"].status, rows["a"].outbox, rows["b"].outbox) == ("queued", None, None)
    with harness.svc.store.begin() as s:  # nothing left for a later round
        assert repo.overdue_tasks(s, now=utcnow(), late=utcnow() + timedelta(seconds=1)) == []


# ---------------------------------------------------------------- 3. claim


def test_a_claim_starts_the_next_attempt_once(harness: Harness) -> None:
    run_id = harness.started(TWO_STAGES)
    until = utcnow() + timedelta(seconds=30)
    with harness.svc.store.begin() as s:
        first = repo.claim_attempt(s, run_id, "a", "w1", lease_until=until)
    with harness.svc.store.begin() as s:
        second = repo.claim_attempt(s, run_id, "a", "w2", lease_until=until)
        takeover = repo.claim_attempt(s, run_id, "a", "w2", lease_until=until, takeover_from=1)
    assert (first, second, takeover) == (1, None, None)  # the lease is live: no takeover either
    row = harness.tasks(run_id)["a"]
    assert (row.status, row.attempts, row.worker) == ("running", 1, "w1")
    with harness.svc.store.begin() as s:  # a pending task is not claimable
        assert repo.claim_attempt(s, run_id, "c", "w1", lease_until=until) is None
    assert harness.tasks(run_id)["c"].attempts == 0


def test_a_redelivered_message_never_runs_the_task_twice(harness: Harness) -> None:
    run_id = harness.started("tasks: [{id: once, handler: 'python:tests.standin:counted'}]")
    first = harness.execute(run_id, "once")
    again = harness.execute(run_id, "once")  # the broker delivered the message a second time
    assert first.record["status"] == again.record["status"] == "succeeded"
    assert standin.calls[(run_id, "once")] == 1
    row = harness.tasks(run_id)["once"]
    assert (row.status, row.attempts, row.worker, row.output) == (
        "succeeded",
        1,
        "standin:1",
        {"attempt": 1, "calls": 1},
    )


def test_a_copy_finds_the_task_held_and_waits(harness: Harness) -> None:
    run_id = harness.started("tasks: [{id: once, handler: 'python:tests.standin:counted'}]")
    assert harness.claim(run_id, "once", "other:9") == 1
    outcome = harness.execute(run_id, "once")
    assert outcome.again_in is not None and outcome.again_in > 0  # comes back when the lease would end
    assert standin.calls[(run_id, "once")] == 0
    row = harness.tasks(run_id)["once"]
    assert (row.status, row.attempts, row.worker) == ("running", 1, "other:9")


# ---------------------------------------------------------------- 4. retry


def test_a_retryable_failure_waits_for_its_due_time(harness: Harness) -> None:
    run_id = harness.started(
        "tasks: [{id: flaky, handler: stub, params: {fail_attempts: 1},"
        " retry: {max_attempts: 3, backoff: 30, jitter: false}}]"
    )
    before = utcnow()
    outcome = harness.execute(run_id, "flaky")
    row = harness.tasks(run_id)["flaky"]
    assert (row.status, row.attempts, row.error_code) == ("retrying", 1, ErrorCode.EXECUTION_ERROR.value)
    assert row.not_before is not None and row.not_before >= before + timedelta(seconds=30)
    assert not row.deferred and outcome.again_in == 30.0  # the message comes back with a countdown
    early = harness.execute(run_id, "flaky")  # delivered before its due time
    assert early.again_in is not None and early.again_in > 0
    assert harness.tasks(run_id)["flaky"].attempts == 1
    assert RunStatus(harness.run(run_id).status) is RunStatus.RUNNING


def test_attempts_used_up_end_the_task_failed(harness: Harness) -> None:
    run_id = harness.started(
        "tasks: [{id: bad, handler: 'python:tests.standin:counted', params: {fail_attempts: 9},"
        " retry: {max_attempts: 2, backoff: 0}}]"
    )
    first = harness.execute(run_id, "bad")
    assert (first.record["status"], harness.tasks(run_id)["bad"].attempts) == ("retrying", 1)
    second = harness.execute(run_id, "bad")  # the retry, due at once
    row = harness.tasks(run_id)["bad"]
    assert (second.record["status"], second.again_in) == ("failed", None)
    assert (row.status, row.attempts, row.error_code) == ("failed", 2, ErrorCode.RETRIES_EXHAUSTED.value)
    harness.execute(run_id, "bad")  # a late copy: the task has ended
    assert standin.calls[(run_id, "bad")] == 2
    assert harness.tasks(run_id)["bad"].attempts == 2


# ---------------------------------------------------------------- 5. skip, 7. finalize


def test_what_depends_on_a_failure_is_skipped_and_the_run_fails(harness: Harness) -> None:
    run_id = harness.started(
        """
        tasks:
          - {id: bad, handler: stub, params: {behavior: failure}, retry: {max_attempts: 1}}
          - {id: ok, handler: stub}
          - {id: after_bad, handler: stub, depends_on: [bad]}
          - {id: independent, handler: stub, depends_on: [ok]}
          - {id: after_after, handler: stub, depends_on: [after_bad]}
        """
    )
    harness.execute(run_id, "bad")
    harness.execute(run_id, "ok")
    harness.advance(run_id, 1)
    rows = harness.tasks(run_id)
    assert (rows["after_bad"].status, rows["after_bad"].error_code) == (
        "skipped",
        ErrorCode.UPSTREAM_FAILED.value,
    )
    assert rows["after_bad"].error_message == "upstream task 'bad' ended failed"
    assert rows["independent"].status == "queued"
    assert "after_bad" not in harness.executed(run_id)
    harness.execute(run_id, "independent")
    harness.advance(run_id, 2)
    rows = harness.tasks(run_id)
    assert (rows["after_after"].status, rows["after_after"].error_message) == (
        "skipped",
        "upstream task 'after_bad' ended skipped",
    )
    assert harness.executed(run_id) == ["bad", "ok", "independent"]
    run = harness.run(run_id)
    assert RunStatus(run.status) is RunStatus.FAILED
    assert run.finished_at is not None and run.statistics is not None


def test_a_run_whose_tasks_all_succeeded_succeeds(harness: Harness) -> None:
    run_id = harness.started(TWO_STAGES)
    harness.execute(run_id, "a")
    harness.execute(run_id, "b")
    assert finalize(harness.svc, run_id) is None  # c has not run: the run is not over
    harness.advance(run_id, 1)
    harness.execute(run_id, "c")
    assert RunStatus(harness.run(run_id).status) is RunStatus.RUNNING  # ends from its last chord body
    harness.advance(run_id, 2)
    assert RunStatus(harness.run(run_id).status) is RunStatus.SUCCEEDED
    assert set(harness.statuses(run_id).values()) == {_T.SUCCEEDED}


# ---------------------------------------------------------------- 6. stop conditions


def test_cancel_cancels_what_waits_and_lets_a_running_task_finish(harness: Harness) -> None:
    run_id = harness.started(
        """
        tasks:
          - {id: busy, handler: stub}
          - {id: flaky, handler: stub, params: {fail_attempts: 1}, retry: {backoff: 30}}
          - {id: waiting, handler: stub}
          - {id: later, handler: stub, depends_on: [busy]}
        """
    )
    harness.execute(run_id, "flaky")  # now retrying
    number = harness.claim(run_id, "busy")  # a worker holds busy
    assert number == 1

    assert producer.cancel(harness.svc, run_id) is RunStatus.RUNNING  # busy is still running
    rows = harness.tasks(run_id)
    for t in ("flaky", "waiting", "later"):
        assert (rows[t].status, rows[t].error_code, rows[t].error_message) == (
            "cancelled",
            ErrorCode.CANCELLED.value,
            "run stopped: cancelled",
        )
    assert rows["busy"].status == "running"
    assert sorted(harness.app.revoked) == sorted(message_id(run_id, t, 0) for t in ("flaky", "waiting"))

    # busy's handler returns: its outcome is kept, and the run ends with it.
    Attempt(harness.rt, run_id, harness.task(run_id, "busy"), number).run({}, None)
    assert harness.tasks(run_id)["busy"].status == "succeeded"
    run = harness.run(run_id)
    assert (RunStatus(run.status), run.stop_reason) == (RunStatus.CANCELLED, "cancelled")


def test_max_failures_stops_the_run(harness: Harness) -> None:
    run_id = harness.started(
        """
        stop: {max_failures: 1}
        tasks:
          - {id: bad, handler: stub, params: {behavior: failure}, retry: {max_attempts: 1}}
          - {id: queued, handler: stub}
          - {id: later, handler: stub, depends_on: [bad]}
        """
    )
    harness.execute(run_id, "bad")
    assert harness.run(run_id).stop_reason == "max_failures"
    harness.execute(run_id, "queued")  # its message arrives after the stop: it never starts
    harness.advance(run_id, 1)
    rows = harness.tasks(run_id)
    assert (rows["queued"].status, rows["queued"].attempts, rows["queued"].error_code) == (
        "cancelled",
        0,
        ErrorCode.CANCELLED.value,
    )
    assert (rows["later"].status, rows["later"].error_message) == ("cancelled", "run stopped: max_failures")
    assert harness.executed(run_id) == ["bad", "queued"]
    assert RunStatus(harness.run(run_id).status) is RunStatus.FAILED


def test_a_run_timeout_stops_the_run_at_its_next_stage(harness: Harness) -> None:
    run_id = harness.started(
        """
        stop: {timeout: 60}
        tasks:
          - {id: a, handler: stub}
          - {id: b, handler: stub, depends_on: [a]}
        """
    )
    harness.execute(run_id, "a")
    with harness.svc.store.begin() as s:  # the run started two minutes ago
        s.execute(
            update(Run).where(Run.run_id == run_id).values(started_at=utcnow() - timedelta(seconds=120))
        )
    harness.advance(run_id, 1)
    rows = harness.tasks(run_id)
    assert (rows["a"].status, rows["b"].status, rows["b"].error_message) == (
        "succeeded",
        "cancelled",
        "run stopped: timeout",
    )
    assert RunStatus(harness.run(run_id).status) is RunStatus.TIMED_OUT


def _failed_after_a_cancel(harness: Harness) -> str:
    """A run cancelled while its one task ran; the handler then failed (attempts remain):
    no retry, the task ends cancelled and the run with it; a late copy changes nothing."""
    run_id = harness.started(
        "tasks: [{id: busy, handler: 'python:tests.standin:counted', params: {fail_attempts: 1},"
        " retry: {max_attempts: 3, backoff: 0}}]"
    )
    number, task = harness.claim(run_id, "busy"), harness.task(run_id, "busy")
    assert number == 1
    assert producer.cancel(harness.svc, run_id) is RunStatus.RUNNING
    Attempt(harness.rt, run_id, task, number).run({}, None)  # the handler fails after the cancel
    assert harness.statuses(run_id)["busy"] is _T.CANCELLED
    assert RunStatus(harness.run(run_id).status) is RunStatus.CANCELLED  # at once, not after a backoff
    harness.execute(run_id, "busy")  # a copy of its message
    return run_id


def test_a_failure_after_a_cancel_is_not_tried_again(harness: Harness) -> None:
    run_id = _failed_after_a_cancel(harness)
    row = harness.tasks(run_id)["busy"]
    assert (row.status, row.attempts, row.error_message) == ("cancelled", 1, "run stopped: cancelled")
    assert standin.calls[(run_id, "busy")] == 1


def test_the_last_task_of_a_cancelled_run_ends_it(harness: Harness) -> None:
    run_id = _failed_after_a_cancel(harness)
    assert harness.statuses(run_id) == {"busy": _T.CANCELLED}
    assert RunStatus(harness.run(run_id).status) is RunStatus.CANCELLED


def test_a_lost_task_of_a_stopped_run_is_cancelled_by_the_reconcilers_copy(harness: Harness) -> None:
    # A short busy timeout (the store's is 30 s): a lock wait fails fast.
    event.listen(harness.svc.store.engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout=50"))
    harness.svc.store.engine.dispose()
    run_id = harness.started(
        """
        stop: {max_failures: 1}
        tasks:
          - {id: bad, handler: stub, params: {behavior: failure}, retry: {max_attempts: 1}}
          - {id: lost, handler: stub}
          - {id: waiting, handler: stub}
        """
    )
    assert harness.claim(run_id, "lost", "dead:1", lease=-1) == 1  # its worker died: the lease ran out
    harness.execute(run_id, "bad")
    assert harness.run(run_id).stop_reason == "max_failures"
    harness.execute(run_id, "lost", detached=True)  # the reconciler's copy, outside any chord
    assert harness.statuses(run_id) == {"bad": _T.FAILED, "lost": _T.CANCELLED, "waiting": _T.CANCELLED}
    assert RunStatus(harness.run(run_id).status) is RunStatus.FAILED


def test_abandon_ends_the_run_and_a_late_outcome_writes_nothing(harness: Harness) -> None:
    run_id = harness.started(
        "tasks: [{id: busy, handler: stub}, {id: later, handler: stub, depends_on: [busy]}]"
    )
    number, task = harness.claim(run_id, "busy"), harness.task(run_id, "busy")
    assert number is not None
    assert abandon(harness.svc, run_id, "the fleet is gone") is True
    assert abandon(harness.svc, run_id, "again") is False
    Attempt(harness.rt, run_id, task, number).run({}, None)  # the lost worker's outcome arrives
    rows = harness.tasks(run_id)
    assert {t: (r.status, r.error_message) for t, r in rows.items()} == {
        "busy": ("cancelled", "the fleet is gone"),
        "later": ("cancelled", "the fleet is gone"),
    }
    run = harness.run(run_id)
    assert (RunStatus(run.status), run.error_message) == (RunStatus.ERROR, "the fleet is gone")


def test_a_run_end_is_final(harness: Harness) -> None:
    run_id = harness.started("tasks: [{id: a, handler: stub}, {id: b, handler: stub, depends_on: [a]}]")
    assert producer.cancel(harness.svc, run_id) is RunStatus.CANCELLED  # nothing was running
    run, logs, sent = harness.run(run_id), harness.log_rows(run_id), len(harness.app.sent)
    assert finalize(harness.svc, run_id) is None
    assert producer.cancel(harness.svc, run_id) is RunStatus.CANCELLED
    dispatch(harness.svc, run_id, 1)
    release(harness.svc, run_id)
    harness.execute(run_id, "a")  # a message revoked too late: the run has ended
    after = harness.run(run_id)
    assert (after.status, after.finished_at, after.statistics) == (
        run.status,
        run.finished_at,
        run.statistics,
    )
    assert harness.statuses(run_id) == {"a": _T.CANCELLED, "b": _T.CANCELLED}
    assert harness.tasks(run_id)["a"].attempts == 0
    assert (harness.log_rows(run_id), len(harness.app.sent)) == (logs, sent)


# ---------------------------------------------------------------- resume and retry


def test_resume_sends_in_flight_tasks_again_without_changing_them(harness: Harness) -> None:
    run_id = harness.started(
        "tasks: [{id: a, handler: stub}, {id: b, handler: stub}, {id: c, handler: stub}]"
    )
    harness.execute(run_id, "a")
    assert harness.claim(run_id, "b", "other:9") == 1
    before = harness.statuses(run_id)
    harness.app.sent.clear()
    assert producer.resume(harness.svc, run_id) == 2
    assert harness.statuses(run_id) == before == {"a": _T.SUCCEEDED, "b": _T.RUNNING, "c": _T.QUEUED}
    assert harness.run(run_id).epoch == 1
    execs = harness.app.named("taskexec.execute")
    assert sorted(m.task_id for m in execs) == [message_id(run_id, "b", 1), message_id(run_id, "c", 1)]
    assert {m.options["chord"]["task"] for m in execs} == {"taskexec.release"}


def test_retry_reopens_the_failure_and_what_it_skipped(harness: Harness) -> None:
    run_id = harness.started(
        """
        tasks:
          - {id: bad, handler: stub, params: {fail_attempts: 1}, retry: {max_attempts: 1}}
          - {id: ok, handler: stub}
          - {id: after_bad, handler: stub, depends_on: [bad]}
        """
    )
    harness.execute(run_id, "bad")
    harness.execute(run_id, "ok")
    harness.advance(run_id, 1)
    assert RunStatus(harness.run(run_id).status) is RunStatus.FAILED
    assert producer.retry_run(harness.svc, run_id) == ["after_bad", "bad"]
    rows = harness.tasks(run_id)
    assert {t: (r.status, r.error_code) for t, r in rows.items()} == {
        "bad": ("pending", None),
        "ok": ("succeeded", None),
        "after_bad": ("pending", None),
    }
    assert (rows["bad"].attempts, rows["bad"].retry_base) == (1, 1)  # a fresh budget, history kept
    run = harness.run(run_id)
    assert (RunStatus(run.status), run.epoch, run.finished_at) == (RunStatus.RUNNING, 1, None)
    assert harness.app.sent[-1].name == "taskexec.release"
    release(harness.svc, run_id)  # the release message, delivered
    assert harness.statuses(run_id)["bad"] is _T.QUEUED
    assert harness.app.sent[-1].task_id == message_id(run_id, "bad", 1)
    harness.execute(run_id, "bad")  # attempt 2, the first of the new try: succeeds
    assert (harness.tasks(run_id)["bad"].status, harness.tasks(run_id)["bad"].attempts) == ("succeeded", 2)


def test_a_retried_timed_out_run_is_not_stopped_again_by_the_reconciler(harness: Harness) -> None:
    run_id = harness.started(
        """
        stop: {timeout: 60}
        tasks:
          - {id: a, handler: stub}
          - {id: b, handler: stub, depends_on: [a]}
        """
    )
    harness.execute(run_id, "a")
    with harness.svc.store.begin() as s:  # the run started two minutes ago: b is cut off
        s.execute(
            update(Run).where(Run.run_id == run_id).values(started_at=utcnow() - timedelta(seconds=120))
        )
    harness.advance(run_id, 1)
    assert RunStatus(harness.run(run_id).status) is RunStatus.TIMED_OUT
    assert producer.retry_run(harness.svc, run_id) == ["b"]  # a person runs b again, now
    release(harness.svc, run_id)
    assert harness.statuses(run_id)["b"] is _T.QUEUED
    reconciler.reconcile(harness.svc, grace=60)  # the reconciler's next round
    assert harness.run(run_id).stop_reason is None
    assert harness.statuses(run_id)["b"] is _T.QUEUED
    assert RunStatus(harness.run(run_id).status) is RunStatus.RUNNING
