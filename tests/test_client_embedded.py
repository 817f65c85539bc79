"""Issue 15: the Python client without a fleet, its waits, and what the CLI shows of a run.

The fast tests work on a SQLite store under a temporary home (no Redis, no worker); the
integration ones start real processes: ``Client.from_env()`` with no broker owns an
embedded fleet, and the README's Python API runs as printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from taskexec import Client, RunHandle, RunStatus, parse_plan
from taskexec.cli import main
from taskexec.errors import BrokerUnavailableError, TaskexecError, WaitTimeoutError
from taskexec.models import RunManifest
from taskexec.plan.compiler import compile_plan
from taskexec.settings import Settings
from taskexec.store import repository as repo
from taskexec.store.tables import Execution
from tests.conftest import ROOT
from tests.test_embedded import LIMIT, assert_nothing_left, env_for, home  # noqa: F401 - a fixture

GATED = {
    "id": "gated",
    "tasks": [
        {"id": "build", "handler": "stub"},
        {"id": "go-live", "handler": "approval", "params": {"message": "Ship it?"}, "depends_on": ["build"]},
    ],
}


def manifest_of(doc: dict[str, object]) -> RunManifest:
    [manifest] = compile_plan(parse_plan(doc))
    return manifest


def settings_for(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", broker_url=None, database_url=None, redis_url=None)


def stored_run(client: Client, doc: dict[str, object]) -> str:
    """A run written to the store as ``submit`` writes it, without sending anything."""
    run_id = "r" + os.urandom(8).hex()
    with client.store.begin() as s:
        repo.add_run(s, run_id, manifest_of(doc))
    return run_id


def test_a_client_without_a_broker_says_what_to_set(tmp_path: Path) -> None:
    with Client(settings_for(tmp_path)) as client, pytest.raises(BrokerUnavailableError) as caught:
        client.submit(manifest_of(GATED))
    assert str(caught.value).startswith("E013 TASKEXEC_BROKER_URL: ")
    assert "Client.from_env()" in str(caught.value)


def test_wait_raises_when_the_run_has_not_ended(tmp_path: Path) -> None:
    with Client(settings_for(tmp_path)) as client:
        run_id = stored_run(client, GATED)
        with pytest.raises(WaitTimeoutError) as caught:
            client.wait(run_id, timeout=0.05, poll=0.01)
        assert isinstance(caught.value, TaskexecError) and isinstance(caught.value, TimeoutError)
        assert str(caught.value).startswith("E002 timeout: ") and run_id in str(caught.value)
        assert caught.value.result.status is RunStatus.QUEUED
        with pytest.raises(WaitTimeoutError):
            RunHandle(run_id, client).wait(timeout=0.01, poll=0.01)


def test_status_shows_the_question_of_a_task_waiting_for_approval(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    with Client(settings) as client:
        run_id = stored_run(client, GATED)
        with client.store.begin() as s:
            s.execute(
                update(Execution)
                .where(Execution.run_id == run_id, Execution.task_id == "go-live")
                .values(status="waiting_approval", output={"approval": {"message": "Ship it?"}})
            )
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TASKEXEC_")}
    env["TASKEXEC_HOME"] = str(settings.home)
    r = CliRunner().invoke(main, ["status", run_id], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "Ship it?" in x)
    assert "go-live" in line and f"taskexec approve {run_id} go-live" in line


# ---------------------------------------------------------------- processes

FROM_ENV = """
from taskexec import Client, parse_plan

plan = parse_plan({"id": "api", "tasks": [{"id": "a", "handler": "stub", "params": {"output": {"n": 1}}},
                                          {"id": "b", "handler": "stub", "depends_on": ["a"]}]})
with Client.from_env() as client:
    result = client.submit(plan).wait(timeout=60)
    print(result.status.value, client.results(result.run_id)[0].output)
"""


@pytest.mark.integration
def test_client_from_env_without_a_broker_owns_an_embedded_fleet(home: Path) -> None:  # noqa: F811
    home.mkdir(parents=True)
    p = subprocess.run(
        [sys.executable, "-c", FROM_ENV],
        env=env_for(home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "succeeded {'n': 1}", p.stdout
    assert_nothing_left(home)


@pytest.mark.integration
@pytest.mark.slow
def test_the_readme_python_api_runs_as_printed(home: Path) -> None:  # noqa: F811
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    [code] = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    home.mkdir(parents=True)
    p = subprocess.run(
        [sys.executable, "-c", code],
        env=env_for(home),
        cwd=ROOT,  # the example names examples/quickstart.yaml
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert p.stdout.splitlines()[0] == "succeeded 12", p.stdout
    assert_nothing_left(home)


def test_a_stopped_run_left_with_a_gate_ends_cancelled_not_error(tmp_path: Path) -> None:
    """Issue 15, defect 6: a gate that opened after the cancel (its attempt ran meanwhile)
    is closed when the embedded fleet stops: the run ends as its stop says, not ``error``."""
    from taskexec.embedded.settle import abandon_unfinished

    settings = settings_for(tmp_path).model_copy(
        update={
            "broker_url": f"redis+socket://{tmp_path}/gone.sock",
            "database_url": f"sqlite:///{tmp_path / 'home' / 'taskexec.db'}",
        }
    )
    with Client(settings_for(tmp_path)) as client:
        cancelled, timed_out = stored_run(client, GATED), stored_run(client, GATED)
        with client.store.begin() as s:
            for run_id, reason in ((cancelled, "cancelled"), (timed_out, "timeout")):
                s.execute(
                    update(Execution)
                    .where(Execution.run_id == run_id, Execution.task_id == "go-live")
                    .values(status="waiting_approval", output={"approval": {"message": "Ship it?"}})
                )
                s.execute(
                    update(Execution)
                    .where(Execution.run_id == run_id, Execution.task_id == "build")
                    .values(status="succeeded")
                )
                repo.set_stop_reason(s, run_id, reason, overwrite=True)
    settled = abandon_unfinished(settings, [cancelled, timed_out], "interrupted by SIGINT")
    assert settled == {cancelled: RunStatus.CANCELLED, timed_out: RunStatus.TIMED_OUT}
    with Client(settings_for(tmp_path)) as client:
        for run_id in (cancelled, timed_out):
            gate = next(t for t in client.status(run_id).tasks if t.id == "go-live")
            assert (gate.status.value, gate.error_code) == ("cancelled", "E004")
