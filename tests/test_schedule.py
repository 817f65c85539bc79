"""Recurring plans: `taskexec schedule` and `taskexec beat`, with real beat and worker processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from taskexec import Client, RunStatus
from taskexec.beat import LOCK
from taskexec.models import RunSummary
from taskexec.schedules import ScheduleInfo, get_schedule
from taskexec.settings import Settings
from tests.conftest import ROOT, Fleet, make_fleet_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(redis_db: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """An executor worker, a control worker, and a beat with a short lock and refresh."""
    tmp = tmp_path_factory.mktemp("schedule")
    env = {
        **make_fleet_env(redis_db, pg_url, tmp / "home"),
        "TASKEXEC_BEAT_LOCK_SECONDS": "3",
        "TASKEXEC_BEAT_REFRESH_SECONDS": "0.5",
    }
    f = Fleet(env, tmp)
    try:
        f.spawn("executor", 2, "sched-exec")
        f.spawn("control", 1, "sched-ctl")
        start_beat(f, "beat-first")
        f.wait_ready("sched-exec", "sched-ctl")
        wait_for(lambda: lock_holder(f), timeout=30, what="an active beat")
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Iterator[Client]:
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    with Client(settings) as c:
        yield c


def start_beat(fleet: Fleet, name: str) -> subprocess.Popen[bytes]:
    """A `taskexec beat` process, logging to ``<name>.log``; stopped with the fleet."""
    with (fleet.logs / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskexec.cli", "beat", "-l", "INFO"],
            env=fleet.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
    fleet.procs.append(proc)
    fleet.names[proc.pid] = name
    return proc


def beat_log(fleet: Fleet, name: str) -> str:
    return (fleet.logs / f"{name}.log").read_text(errors="replace")


def lock_holder(fleet: Fleet) -> int | None:
    """The pid of the beat holding the lock (its token is host:pid:nonce), if any."""
    with redis.Redis.from_url(fleet.env["TASKEXEC_BROKER_URL"]) as r:
        value = r.get(LOCK)
    return int(value.decode().split(":")[1]) if value else None


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cli(fleet: Fleet, *args: str) -> Ran:
    """`taskexec ARGS` in this process (a subprocess costs a second of imports each)."""
    from taskexec.cli import main

    result = CliRunner(env=fleet.env).invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def taskexec_process(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """`taskexec ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "taskexec.cli", *args],
        env=fleet.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def add(fleet: Fleet, plan: Path, *args: str) -> str:
    p = cli(fleet, "schedule", "add", str(plan), *args)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def schedule_info(fleet: Fleet, sid: str) -> dict[str, Any]:
    """The schedule as `taskexec schedule list --json` shows it."""
    p = cli(fleet, "schedule", "list", "--json")
    assert p.returncode == 0, p.stderr
    found: dict[str, Any] = next(s for s in json.loads(p.stdout) if s["id"] == sid)
    return found


def stored(client: Client, sid: str) -> ScheduleInfo:
    """The schedule as stored now (cheaper to poll than the command)."""
    with client.store.begin() as s:
        return get_schedule(s, sid)


def runs_of(client: Client, sid: str) -> list[RunSummary]:
    """Runs of a schedule, oldest first."""
    return sorted(client.runs(label=("schedule", sid), limit=1000), key=lambda r: r.submitted_at)


def plan_file(tmp_path: Path, delay: float) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps({"id": "recurring", "tasks": [{"id": "t", "handler": "stub", "params": {"delay": delay}}]})
    )
    return path


def settle(fleet: Fleet, client: Client, sid: str) -> list[RunSummary]:
    """Remove a schedule, cancel what it left running, and return its runs once all ended."""
    assert cli(fleet, "schedule", "remove", sid).returncode == 0
    for r in runs_of(client, sid):
        if not r.status.terminal:
            client.cancel(r.run_id)
    wait_for(lambda: all(r.status.terminal for r in runs_of(client, sid)), timeout=30, what="runs to end")
    return runs_of(client, sid)


def test_schedule_add_list_remove(fleet: Fleet, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": [{"id": "a", "handler": "stub", "depends_on": ["ghost"]}]}))
    p = taskexec_process(fleet, "schedule", "add", str(bad), "--every", "1h")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == "taskexec: E001 tasks[0].depends_on[0]: unknown task 'ghost'"
    p = cli(fleet, "schedule", "add", str(plan_file(tmp_path, 0)), "--cron", "61 * * * *")
    assert p.returncode == 2 and "E001 --cron" in p.stderr, p.stderr

    sid = add(
        fleet, plan_file(tmp_path, 0), "--cron", "0 3 * * mon-fri", "--label", "team=qa", "--id", "nightly"
    )
    assert sid == "nightly"
    info = schedule_info(fleet, sid)
    assert info["cron"] == "0 3 * * mon-fri" and info["every_seconds"] is None
    assert info["overlap"] == "skip" and info["labels"] == {"team": "qa"} and info["plan_id"] == "recurring"
    p = cli(fleet, "schedule", "add", str(plan_file(tmp_path, 0)), "--every", "10m", "--id", "nightly")
    assert p.returncode == 2 and "already exists" in p.stderr

    table = cli(fleet, "schedule", "list")
    assert "nightly  recurring  cron 0 3 * * mon-fri  overlap=skip" in table.stdout
    assert cli(fleet, "schedule", "remove", "nightly").returncode == 0
    assert "nightly" not in cli(fleet, "schedule", "list").stdout
    p = cli(fleet, "schedule", "remove", "nightly")
    assert p.returncode == 2 and "no schedule 'nightly'" in p.stderr


def test_an_interval_schedule_fires_and_skip_never_overlaps_runs(
    fleet: Fleet, client: Client, tmp_path: Path
) -> None:
    sid = add(fleet, plan_file(tmp_path, 2.5), "--every", "2s", "--label", "kind=skip")
    wait_for(
        lambda: (
            sum(r.status is RunStatus.SUCCEEDED for r in runs_of(client, sid)) >= 2
            and stored(client, sid).skipped >= 1
        ),
        timeout=40,
        interval=0.2,
        what="two runs succeeded and a firing skipped",
    )
    info = schedule_info(fleet, sid)
    assert info["last_run_at"] is not None  # beat's state is in the store
    runs = settle(fleet, client, sid)
    assert all(r.labels == {"kind": "skip", "schedule": sid} for r in runs)
    finished = [r for r in runs if r.status is RunStatus.SUCCEEDED]
    assert len(finished) >= 2
    for before, after in itertools.pairwise(runs):
        assert before.finished_at is not None and after.submitted_at >= before.finished_at, (before, after)


def test_allow_lets_runs_of_a_schedule_overlap(fleet: Fleet, client: Client, tmp_path: Path) -> None:
    sid = add(fleet, plan_file(tmp_path, 6), "--every", "2s", "--overlap", "allow")

    def overlapping() -> bool:
        return sum(not r.status.terminal for r in runs_of(client, sid)) >= 2

    wait_for(overlapping, timeout=30, what="two runs of the schedule active at once")
    runs = settle(fleet, client, sid)
    assert all(r.labels == {"schedule": sid} for r in runs)


def test_a_second_beat_stands_by_and_takes_over_when_the_first_dies(
    fleet: Fleet, client: Client, tmp_path: Path
) -> None:
    active = lock_holder(fleet)
    assert active is not None
    standby = start_beat(fleet, "beat-standby")
    wait_for(lambda: "stands by" in beat_log(fleet, "beat-standby"), timeout=30, what="the standby beat")
    sid = add(fleet, plan_file(tmp_path, 0), "--every", "1s", "--overlap", "allow")
    wait_for(lambda: len(runs_of(client, sid)) >= 3, timeout=30, what="three runs fired by the active beat")
    # Two beats, one firing: the standby sent nothing.
    assert "Sending due task" not in beat_log(fleet, "beat-standby")
    assert lock_holder(fleet) == active

    os.killpg(active, signal.SIGKILL)  # no clean exit: the lock has to run out
    wait_for(lambda: lock_holder(fleet) == standby.pid, timeout=30, what="the standby to take the lock")
    wait_for(
        lambda: f"Sending due task schedule:{sid}" in beat_log(fleet, "beat-standby"),
        timeout=30,
        what="the new active beat to fire",
    )
    fired_before = len(runs_of(client, sid))
    wait_for(
        lambda: len(runs_of(client, sid)) > fired_before, timeout=30, what="a run fired after the takeover"
    )
    runs = settle(fleet, client, sid)  # the last one may be cancelled by the clean-up
    assert sum(r.status is RunStatus.SUCCEEDED for r in runs) >= fired_before, [r.status for r in runs]
