"""Embedded mode: `taskexec run` with no broker starts Redis and a worker, and stops them.

Every test runs the real command in a subprocess with its own short ``TASKEXEC_HOME`` and
then looks for anything left behind by walking ``/proc``: a process whose command line or
environment names that home (the redis-server, the worker and its pool, commands started
by shell tasks) must not outlive the command, however it ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xmlschema
import yaml

from taskexec import compile_plan, load_plan
from taskexec.embedded import (
    EmbeddedFleet,
    Interrupted,
    interrupt_on_signals,
    marked_processes,
)
from taskexec.errors import WorkerLostError
from taskexec.settings import Settings
from tests.conftest import ROOT, wait_for

TASKEXEC = [sys.executable, "-m", "taskexec.cli"]
LIMIT = 120  # seconds any one command may take before the test fails


def procs_of(home: Path) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose command line or environment names ``home``."""
    needle = str(home).encode()
    found = []
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except (OSError, IndexError):
            continue
        if needle in cmdline or needle in environ:
            found.append((int(pid), cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]))
    return found


def assert_nothing_left(home: Path) -> None:
    """No process of the embedded fleet in ``home`` is alive, and its socket is gone."""
    # The command has exited; SIGKILLed orphans may need a moment to be reaped by init.
    try:
        wait_for(lambda: not procs_of(home), timeout=10, what="the fleet's processes to be gone")
    except AssertionError:
        raise AssertionError(f"processes left behind: {procs_of(home)}") from None
    assert not list(home.glob("redis-*.sock")), "the Redis socket was left behind"


@pytest.fixture
def home() -> Iterator[Path]:
    """A short TASKEXEC_HOME (a Unix socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tx-", dir="/tmp"))
    try:
        yield path / "home"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def env_for(home: Path) -> dict[str, str]:
    """The environment of a command: its own home, no other TASKEXEC_*, no forced colours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    env["TASKEXEC_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    return env


def write_plan(home: Path, doc: dict[str, Any]) -> Path:
    path = home.parent / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def taskexec(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKEXEC, *args],
        check=False,
        env=env_for(home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        stdin=subprocess.DEVNULL,
    )


def start(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TASKEXEC, *args],
        env=env_for(home),
        cwd=home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def running_tasks(home: Path) -> int:
    """Tasks in status ``running``, read from the embedded SQLite store."""
    db = home / "taskexec.db"
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return int(conn.execute("select count(*) from executions where status = 'running'").fetchone()[0])
    except sqlite3.Error:  # not created yet, or locked for a moment
        return 0


def worker_pid(proc: subprocess.Popen[str]) -> int | None:
    """The embedded worker's main process: the child of `taskexec run` running celery."""
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == proc.pid and b"celery" in cmdline:
            return int(pid)
    return None


def long_plan(home: Path) -> dict[str, Any]:
    """Two tasks that run until stopped: a stub that waits, a shell command that sleeps.

    The command's environment names ``home`` (the ``env`` param), so that
    :func:`procs_of` finds it whatever its parent is by then.
    """
    return {
        "id": "long",
        "defaults": {"retry": {"max_attempts": 1}},
        "tasks": [
            {"id": "wait", "handler": "stub", "params": {"delay": 60}},
            {
                "id": "sleep",
                "handler": "shell",
                "params": {"argv": ["sleep", "60"], "env": {"HOME_OF": str(home)}},
            },
            {"id": "after", "handler": "stub", "depends_on": ["wait"]},
        ],
    }


@pytest.mark.integration
def test_success_leaves_nothing_and_results_outlive_the_run(home: Path) -> None:
    p = taskexec(home, "run", str(ROOT / "examples" / "quickstart.yaml"), "--json")
    assert p.returncode == 0, p.stderr
    [result] = json.loads(p.stdout)
    assert result["status"] == "succeeded"
    assert_nothing_left(home)
    run_id = result["run_id"]

    status = taskexec(home, "status", run_id, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["tasks"] == result["tasks"]
    listed = taskexec(home, "runs", "--json")
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [run_id]
    table = taskexec(home, "results", run_id, "--format", "table")
    assert table.returncode == 0 and "score[0]" in table.stdout and "\x1b[" not in table.stdout
    assert_nothing_left(home)  # reading results starts nothing


@pytest.mark.integration
@pytest.mark.slow
def test_failure_leaves_nothing(home: Path) -> None:
    doc = {
        "defaults": {"retry": {"max_attempts": 1}},
        "tasks": [
            {"id": "ok", "handler": "stub"},
            {"id": "bad", "handler": "shell", "params": {"argv": ["sh", "-c", "exit 3"]}},
            {"id": "after", "handler": "stub", "depends_on": ["bad"]},
        ],
    }
    p = taskexec(home, "run", str(write_plan(home, doc)))
    assert p.returncode == 1, p.stderr
    # Not a terminal: no live view, just the result, and no escape code anywhere.
    assert "\x1b[" not in p.stdout + p.stderr
    assert ": failed, 1/3 succeeded, 1 failed, 1 skipped" in p.stdout
    assert_nothing_left(home)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_cancels_the_run_and_stops_everything(home: Path, sig: signal.Signals) -> None:
    proc = start(home, "run", str(write_plan(home, long_plan(home))))
    try:
        wait_for(lambda: running_tasks(home) == 2, timeout=60, what="both tasks to run")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("taskexec: ") for line in lines), err
    assert lines[-1].startswith(f"taskexec: interrupted by {sig.name}: stopped the embedded worker"), err
    assert_nothing_left(home)  # the shell task's `sleep 60` included

    runs = json.loads(taskexec(home, "runs", "--json").stdout)
    assert [r["status"] for r in runs] == ["cancelled"], runs
    assert f"run {runs[0]['run_id']} cancelled" in lines[-1]
    result = json.loads(taskexec(home, "status", runs[0]["run_id"], "--json").stdout)
    assert {t["id"]: t["status"] for t in result["tasks"]} == {
        "wait": "cancelled",
        "sleep": "cancelled",
        "after": "cancelled",
    }


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_worker_ends_the_run_with_exit_3(home: Path) -> None:
    proc = start(home, "run", str(write_plan(home, long_plan(home))))
    try:
        wait_for(lambda: running_tasks(home) == 2, timeout=60, what="both tasks to run")
        pid = worker_pid(proc)
        assert pid is not None, "no embedded worker found"
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, (proc.returncode, err)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("taskexec: E011: the embedded Celery worker died"), err
    assert "SIGKILL" in err
    assert_nothing_left(home)  # the pool and the shell task's `sleep 60` included

    [run] = json.loads(taskexec(home, "runs", "--json").stdout)
    assert run["status"] == "error"


@pytest.mark.integration
@pytest.mark.slow
def test_two_embedded_runs_in_different_homes_at_once() -> None:
    homes = [Path(tempfile.mkdtemp(prefix="tx-", dir="/tmp")) / "home" for _ in range(2)]
    try:
        doc = {"tasks": [{"id": f"t{i}", "handler": "stub", "params": {"delay": 1}} for i in range(3)]}
        procs = [start(h, "run", str(write_plan(h, doc)), "--json") for h in homes]
        outs = [p.communicate(timeout=LIMIT) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
            assert json.loads(out)[0]["status"] == "succeeded"
        ids = [json.loads(out)[0]["run_id"] for out, _ in outs]
        for h, run_id in zip(homes, ids, strict=True):
            assert_nothing_left(h)
            [listed] = json.loads(taskexec(h, "runs", "--json").stdout)
            assert listed["run_id"] == run_id  # each home has its own store
    finally:
        for h in homes:
            shutil.rmtree(h.parent, ignore_errors=True)


# ----------------------------------------------------------------- in process


def test_interrupt_on_signals_raises_and_restores() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, interrupt_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: False, timeout=5, what="the signal")
    assert caught.value.signum == signal.SIGTERM
    assert isinstance(caught.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupt_on_signals_keeps_an_ignored_signal_ignored() -> None:
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with interrupt_on_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.integration
def test_check_reports_a_dead_worker(home: Path) -> None:
    fleet = EmbeddedFleet(home)
    fleet.worker_proc = subprocess.Popen([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    fleet.worker_proc.wait(timeout=30)
    with pytest.raises(WorkerLostError, match="killed by SIGKILL") as caught:
        fleet.check()
    assert str(caught.value).startswith("E011")


@pytest.mark.integration
@pytest.mark.slow
def test_the_fleet_in_process_with_a_home_too_long_for_a_socket(tmp_path: Path) -> None:
    fleet = EmbeddedFleet(tmp_path / ("x" * 120), concurrency=1)
    assert len(str(fleet.socket)) < 100 and not str(fleet.socket).startswith(str(tmp_path))
    with fleet:
        fleet.check()  # both alive
        assert fleet.env()["_TASKEXEC_EMBEDDED_FLEET"] == fleet.marker == str(fleet.socket)
        redis_proc, worker_proc = fleet.redis_proc, fleet.worker_proc
        assert redis_proc is not None and worker_proc is not None
        marked = marked_processes(fleet.marker)
        assert worker_proc.pid in marked and len(marked) >= 2  # the worker and its pool process
    assert redis_proc.returncode is not None and worker_proc.returncode is not None
    assert marked_processes(fleet.marker) == []
    assert not fleet.socket.parent.exists()  # the directory made for the socket is gone too
    assert {"redis", "store", "startup", "shutdown"} <= set(fleet.timings)


@pytest.mark.integration
def test_the_workers_get_the_operator_limits_on_what_a_plan_reaches(tmp_path: Path) -> None:
    base = Settings(secrets="OPENAI_*,SCORER_KEY", shell_user="nobody", http_allow="127.0.0.1,*.svc")
    env = EmbeddedFleet(tmp_path, base=base).env()
    assert env["TASKEXEC_SECRETS"] == "OPENAI_*,SCORER_KEY"
    assert env["TASKEXEC_SHELL_USER"] == "nobody"
    assert env["TASKEXEC_HTTP_ALLOW"] == "127.0.0.1,*.svc"
    unset = EmbeddedFleet(tmp_path).env()
    assert Settings(**{k[9:].lower(): v for k, v in unset.items() if k.startswith("TASKEXEC_")}).secrets == []


# ------------------------------------------------------------------- examples


def test_every_example_plan_compiles() -> None:
    plans = sorted((ROOT / "examples").glob("*.yaml"))
    assert {p.name for p in plans} >= {"quickstart.yaml", "llm-regression.yaml", "data-pipeline.yaml"}
    for path in plans:
        assert compile_plan(load_plan(str(path))), path


@pytest.mark.integration
@pytest.mark.slow
def test_the_examples_run() -> None:
    homes = [Path(tempfile.mkdtemp(prefix="tx-", dir="/tmp")) / "home" for _ in range(3)]
    junit = homes[0].parent / "llm.xml"
    commands = [
        # Plans whose shell steps name examples/*.py run from the repository root.
        ([*TASKEXEC, "run", "examples/llm-regression.yaml", "--junit", str(junit)], ROOT),
        ([*TASKEXEC, "run", "examples/data-pipeline.yaml", "--json"], ROOT),
        (
            [
                sys.executable,
                str(ROOT / "examples" / "producer.py"),
                "--junit",
                str(homes[2].parent / "p.xml"),
            ],
            homes[2].parent,
        ),
    ]
    try:
        procs = [
            subprocess.Popen(
                cmd,
                env=env_for(h),
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            for (cmd, cwd), h in zip(commands, homes, strict=True)
        ]
        outs = [p.communicate(timeout=LIMIT) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, (p.args, out[-1000:], err[-2000:])
        xmlschema.XMLSchema(str(ROOT / "tests" / "data" / "junit-10.xsd")).validate(str(junit))
        assert "llm-regression/baseline" in outs[0][0] and "llm-regression/candidate" in outs[0][0]
        [pipeline] = json.loads(outs[1][0])
        publish = next(t for t in pipeline["tasks"] if t["id"] == "publish")
        assert json.loads(publish["output"]["stdout"])["top_region"] in {"north", "south", "east", "west"}
        assert "quickstart/default" in outs[2][0] and (homes[2].parent / "p.xml").exists()
        assert not (homes[2].parent / "producer-junit.xml").exists()  # only where asked
        for h in homes:
            assert_nothing_left(h)
    finally:
        for h in homes:
            shutil.rmtree(h.parent, ignore_errors=True)


def waiting_gate(home: Path) -> str | None:
    """The run id of a task waiting for approval, read from the embedded SQLite store."""
    db = home / "taskexec.db"
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            row = conn.execute("select run_id from executions where status = 'waiting_approval'").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])


@pytest.mark.integration
def test_an_embedded_run_is_approved_from_another_terminal(home: Path) -> None:
    doc = {
        "tasks": [
            {"id": "gate", "handler": "approval", "params": {"message": "go?"}},
            {"id": "after", "handler": "stub", "depends_on": ["gate"], "params": {"output": {"done": True}}},
        ]
    }
    plan = write_plan(home, doc)
    proc = start(home, "run", str(plan), "--json")
    try:
        wait_for(lambda: waiting_gate(home) is not None, timeout=LIMIT, what="the gate waiting")
        run_id = waiting_gate(home)
        assert run_id is not None
        p = taskexec(home, "approve", run_id, "gate", "--reason", "looks good", "--by", "ana")
        assert p.returncode == 0 and "approved" in p.stdout, p.stderr
        out, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    [result] = json.loads(out)
    tasks = {t["id"]: t for t in result["tasks"]}
    assert tasks["gate"]["output"]["by"] == "ana" and tasks["after"]["output"] == {"done": True}
    assert_nothing_left(home)
    # No embedded run in progress any more: the command says what it needs.
    p = taskexec(home, "approve", run_id, "gate")
    assert p.returncode == 2 and "embedded `taskexec run` in progress" in p.stderr


def test_attach_with_the_default_relative_home_gives_an_absolute_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, defect 1: ``.taskexec`` read as the host of ``redis+socket://.taskexec/...``."""
    import redis

    from taskexec.celery_app import redis_url
    from taskexec.embedded import attach, live_socket

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".taskexec").mkdir()
    sock = tmp_path / ".taskexec" / f"redis-{os.getpid()}.sock"  # a live pid: this one
    sock.touch()
    monkeypatch.setattr(redis.Redis, "ping", lambda self: True)  # a server that answers
    assert live_socket(Path(".taskexec")) == sock.resolve()
    attached = attach(Settings(home=Path(".taskexec"), broker_url=None, database_url=None))
    assert attached is not None
    assert attached.broker_url == f"redis+socket://{sock.resolve()}"
    assert attached.database_url == f"sqlite:///{(tmp_path / '.taskexec' / 'taskexec.db').resolve()}"
    client = redis.Redis.from_url(redis_url(attached))
    try:
        assert client.connection_pool.connection_kwargs["path"] == str(sock.resolve())
    finally:
        client.close()


# ------------------------------------------------------------- issue 15


def gate_plan(home: Path) -> Path:
    """A quick task, an approval gate after it, a task after the gate."""
    doc = {
        "id": "gate",
        "tasks": [
            {"id": "build", "handler": "stub"},
            {
                "id": "go-live",
                "handler": "approval",
                "params": {"message": "Ship it?"},
                "depends_on": ["build"],
            },
            {"id": "after", "handler": "stub", "depends_on": ["go-live"]},
        ],
    }
    home.parent.mkdir(parents=True, exist_ok=True)
    return write_plan(home, doc)


def default_home_env(cwd: Path) -> dict[str, str]:
    """An environment with no TASKEXEC_HOME: the default, ``.taskexec`` under ``cwd``."""
    env = env_for(cwd / ".taskexec")
    del env["TASKEXEC_HOME"]
    return env


def in_dir(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKEXEC, *args],
        check=False,
        env=default_home_env(cwd),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.integration
def test_the_default_home_is_controlled_from_another_terminal(home: Path) -> None:
    """Issue 15, defects 1 and 13: approve and cancel with the default (relative) home."""
    cwd = home.parent
    home = cwd / ".taskexec"
    plan = gate_plan(home)
    proc = subprocess.Popen(
        [*TASKEXEC, "run", str(plan), "--json"],
        env=default_home_env(cwd),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: waiting_gate(home) is not None, timeout=LIMIT, what="the gate waiting")
        run_id = waiting_gate(home)
        assert run_id is not None
        shown = in_dir(cwd, "status", run_id)
        assert "go-live waits for approval: Ship it?" in shown.stdout, shown.stdout
        p = in_dir(cwd, "approve", run_id, "go-live", "--by", "ana")
        assert p.returncode == 0 and p.stdout.strip() == f"{run_id} go-live: approved (succeeded)", p
        assert p.stderr == ""
        out, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert [t["status"] for t in json.loads(out)[0]["tasks"]] == ["succeeded"] * 3

    # A run that goes on until cancelled: `cancel` says `cancelling` until it ends.
    proc = subprocess.Popen(
        [*TASKEXEC, "run", str(write_plan(home, long_plan(home)))],
        env=default_home_env(cwd),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: running_tasks(home) == 2, timeout=LIMIT, what="both tasks to run")
        runs = json.loads(in_dir(cwd, "runs", "--json").stdout)
        long_id = next(r["run_id"] for r in runs if r["plan_id"] == "long")
        p = in_dir(cwd, "cancel", long_id)
        assert p.returncode == 0 and p.stdout.strip() == f"{long_id}: cancelling", p
        assert p.stderr == ""
        p = in_dir(cwd, "cancel", long_id, "--wait")
        assert p.returncode == 0 and p.stdout.strip() == f"{long_id}: cancelled", p
        assert p.stderr == ""
        out, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "cancelled" in out, (out, err)
    assert_nothing_left(home)


def stored(home: Path, run_id: str) -> dict[str, Any]:
    p = taskexec(home, "status", run_id, "--json")
    assert "Traceback" not in p.stderr, p.stderr
    return dict(json.loads(p.stdout))


@pytest.mark.integration
def test_run_timeout_stops_an_embedded_run_timed_out(home: Path) -> None:
    """Issue 15, defect 6: `run --timeout` ends the run `timed_out`, printed as stored."""
    p = taskexec(home, "run", str(gate_plan(home)), "--timeout", "3")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    first, line = p.stdout.strip().splitlines()  # the run id when submitted, then the summary
    run_id = line.split()[1].rstrip(":")
    assert first.split() == [run_id, "gate/default:", "submitted"], first
    assert line.startswith(f"gate/default {run_id}: timed_out"), line
    result = stored(home, run_id)
    assert result["status"] == "timed_out"
    left = [t for t in result["tasks"] if t["status"] != "succeeded"]
    assert left and all(t["status"] == "cancelled" and t["error_code"] == "E004" for t in left), left
    assert {t["id"] for t in left} >= {"go-live", "after"}
    assert_nothing_left(home)


@pytest.mark.integration
def test_ctrl_c_cancels_an_embedded_run_waiting_at_a_gate(home: Path) -> None:
    """Issue 15, defect 6: Ctrl-C ends the run `cancelled`, its gate closed, printed as stored."""
    proc = start(home, "run", str(gate_plan(home)))
    try:
        wait_for(lambda: waiting_gate(home) is not None, timeout=LIMIT, what="the gate waiting")
        run_id = waiting_gate(home)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"run {run_id} cancelled"), err
    result = stored(home, str(run_id))
    assert result["status"] == "cancelled"
    tasks = {t["id"]: (t["status"], t["error_code"]) for t in result["tasks"]}
    assert tasks == {
        "build": ("succeeded", None),
        "go-live": ("cancelled", "E004"),
        "after": ("cancelled", "E004"),
    }
    assert_nothing_left(home)
