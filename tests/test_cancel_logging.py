"""A normal cancel is no failure in the worker log (issue 15, defect 11).

A cancel revokes the run's queued messages; Celery then fails the stage's chord and calls
its error callback, ``stage_failed``. That is how a cancel ends a chord: logged at INFO,
without a traceback. A chord that fails for another reason stays an ERROR.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import ChordError, TaskRevokedError

from taskexec import Client, RunStatus, parse_plan
from taskexec.models import RunManifest
from taskexec.plan import compile_plan
from taskexec.services import Services
from taskexec.settings import Settings
from taskexec.store import repository as repo
from taskexec.store.engine import Store
from tests.conftest import Fleet, wait_for
from tests.standin import StandinApp
from workers import tasks
from workers.runtime import Runtime


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_all()
    settings = Settings(database_url=url, home=tmp_path, allowed_handlers=["stub"])
    rt = Runtime(Services(settings, StandinApp(), store, None), worker="standin:1")
    monkeypatch.setattr(tasks, "_runtime", rt)
    try:
        yield rt
    finally:
        store.close()


def _manifest() -> RunManifest:
    [m] = compile_plan(parse_plan("tasks: [{id: a, handler: stub}, {id: b, handler: stub, depends_on: [a]}]"))
    return m


def test_the_chord_of_a_cancelled_run_is_info_not_an_error(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    with runtime.store.begin() as s:
        repo.add_run(s, "r1", _manifest())
        repo.set_stop_reason(s, "r1", "cancelled", overwrite=True)
    with caplog.at_level(logging.DEBUG):
        tasks.stage_failed(run_id="r1", stage=0)
    mine = [r for r in caplog.records if "r1" in r.getMessage()]
    seen = [(r.levelname, r.getMessage()) for r in mine]
    assert mine and all(r.levelno == logging.INFO for r in mine), seen
    assert all(r.exc_info is None for r in caplog.records)
    assert "cancel" in mine[0].getMessage()
    with runtime.store.begin() as s:  # no infrastructure incident recorded on a cancelled run
        assert repo.get_run(s, "r1").error_message is None


def test_a_chord_failing_in_a_running_run_stays_an_error(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    with runtime.store.begin() as s:
        repo.add_run(s, "r2", _manifest())
    with caplog.at_level(logging.DEBUG):
        tasks.stage_failed(run_id="r2", stage=0)
    assert any(r.levelno == logging.ERROR and "r2" in r.getMessage() for r in caplog.records)
    with runtime.store.begin() as s:
        assert "infrastructure" in (repo.get_run(s, "r2").error_message or "")


def test_celerys_chord_error_for_a_revoked_part_is_info_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What Celery's Redis backend logs when a revoked header task fails the chord."""
    logger = logging.getLogger("celery.backends.redis")
    revoked = ChordError(f"Dependency abc raised {TaskRevokedError('revoked')!r}")
    broken = ChordError("Dependency abc raised ConnectionError('gone')")
    with caplog.at_level(logging.DEBUG):
        for exc in (revoked, broken):
            try:
                raise exc
            except ChordError as e:
                logger.exception("Chord %r raised: %r", "group-1", e)
    first, second = caplog.records[-2:]
    assert first.levelno == logging.INFO and first.exc_info is None and "revoked" in first.getMessage()
    assert second.levelno == logging.ERROR and second.exc_info is not None  # a real failure stays


@pytest.mark.integration
def test_a_cancel_writes_no_error_to_the_worker_log(fleet_env: dict[str, str], tmp_path: Path) -> None:
    fleet = Fleet(fleet_env, tmp_path)
    try:
        proc = fleet.spawn("executor,validator", 2, "cancelling", "-l", "INFO")
        fleet.wait_ready(fleet.names[proc.pid])
        settings = fleet.settings()
        assert isinstance(settings, Settings)
        # Two slots, six tasks: four queued (revoked by the cancel), then a stage after them.
        doc = {
            "tasks": [{"id": f"long{i}", "handler": "stub", "params": {"delay": 30}} for i in range(6)]
            + [{"id": "tail", "handler": "stub", "depends_on": ["long0"]}]
        }
        with Client(settings) as client:
            handle = client.submit(parse_plan(doc))
            wait_for(lambda: handle.status().statistics.running >= 2, what="tasks running")
            handle.cancel()
            wait_for(lambda: handle.status().status is RunStatus.CANCELLED, timeout=60, what="cancelled")
        log = tmp_path / "cancelling.log"
        # The chord's error callback has run when it logged the cancel.
        logged = lambda: "ended by its cancel" in log.read_text(errors="replace")  # noqa: E731
        wait_for(logged, timeout=60, what="the chord's error callback")
        text = log.read_text(errors="replace")
        lines = [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]
        assert not lines, text[-4000:]
        assert "ChordError" not in text or "Traceback" not in text
    finally:
        fleet.stop()
