"""Run ids people can type (issue 16): unique prefixes, ``--last``, the id first in ``run``'s
output; ``compile`` in full and ``--brief``; ``examples/producer.py``'s JUnit path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner, Result

from taskexec import Client, Settings
from taskexec.cli import main
from taskexec.errors import ConflictError, InvalidInputError, RunNotFoundError, TaskexecError
from taskexec.models import ManifestTask, RunManifest, RunStatus, TaskStatus
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.store.repository.runs import CANDIDATES
from taskexec.store.tables import utcnow
from tests.standin import harness

ROOT = Path(__file__).resolve().parent.parent

#: Ids chosen so that ``abcdef`` is ambiguous, ``abcdef0`` and ``abcdef1`` are unique.
IDS = {
    "abcdef0123456789abcdef0123456789": "alpha",
    "abcdef1123456789abcdef0123456789": "beta",
    "0bcdef2123456789abcdef0123456789": "alpha",
}


def _manifest(plan_id: str) -> RunManifest:
    task = ManifestTask(id="a", stage=0, handler="stub", params={})
    return RunManifest(plan_id=plan_id, stages=[["a"]], tasks=[task])


def _add(store: Store, ids: dict[str, str]) -> None:
    """Runs of ``ids`` (id → plan), submitted a minute apart in this order."""
    t0 = utcnow() - timedelta(hours=1)
    with store.begin() as s:
        for k, (run_id, plan_id) in enumerate(ids.items()):
            repo.add_run(s, run_id, _manifest(plan_id), now=t0 + timedelta(minutes=k))


# --- the repository ---------------------------------------------------------------------


def test_a_unique_prefix_resolves_to_its_run(store: Store) -> None:
    _add(store, IDS)
    with store.begin() as s:
        assert repo.resolve_run_id(s, "abcdef0") == "abcdef0123456789abcdef0123456789"
        assert repo.resolve_run_id(s, "0bcdef") == "0bcdef2123456789abcdef0123456789"
        full = "abcdef1123456789abcdef0123456789"
        assert repo.resolve_run_id(s, full) == full


def test_an_ambiguous_prefix_names_its_candidates(store: Store) -> None:
    _add(store, IDS)
    with store.begin() as s, pytest.raises(InvalidInputError) as e:
        repo.resolve_run_id(s, "abcdef")
    text = str(e.value)
    assert text.startswith("E001 RUN: run id prefix 'abcdef' is ambiguous")
    assert "abcdef0123456789abcdef0123456789" in text and "abcdef1123456789abcdef0123456789" in text
    assert "0bcdef" not in text


def test_an_ambiguous_prefix_names_a_few_candidates_only(store: Store) -> None:
    many = {f"fedcba{k:02d}" + "0" * 24: "p" for k in range(CANDIDATES + 3)}
    _add(store, many)
    with store.begin() as s, pytest.raises(InvalidInputError) as e:
        repo.resolve_run_id(s, "fedcba")
    named = [w.strip(",") for w in str(e.value).split() if w.startswith("fedcba0") or w.startswith("fedcba1")]
    assert len(named) == CANDIDATES and str(e.value).rstrip(")").endswith("… (give more characters")


def test_unknown_and_short_prefixes_are_not_found(store: Store) -> None:
    _add(store, IDS)
    with store.begin() as s:
        for ref in ("abcdef9", "bcdef0", "abcde", "abc", "abcdef0123456789abcdef01234567890"):
            with pytest.raises(RunNotFoundError, match=f"no run '{ref}' in the store"):
                repo.resolve_run_id(s, ref)
        with pytest.raises(RunNotFoundError, match="at least 6 characters"):
            repo.resolve_run_id(s, "abcde")


def test_a_prefix_is_not_a_pattern(store: Store) -> None:
    _add(store, {"ab_de%0123456789abcdef0123456789": "p", "abxdey0123456789abcdef0123456789": "p"})
    with store.begin() as s:
        assert repo.resolve_run_id(s, "ab_de%") == "ab_de%0123456789abcdef0123456789"
        with pytest.raises(RunNotFoundError):
            repo.resolve_run_id(s, "ab_dey")


def test_an_exact_id_wins_over_longer_ones_it_prefixes(store: Store) -> None:
    _add(store, {"run-one": "p", "run-one-b": "p"})
    with store.begin() as s:
        assert repo.resolve_run_id(s, "run-one") == "run-one"
        assert repo.resolve_run_id(s, "run-one-") == "run-one-b"


def test_the_latest_run_of_all_or_of_a_plan(store: Store) -> None:
    with store.begin() as s:
        assert repo.latest_run_id(s) is None
    _add(store, IDS)
    with store.begin() as s:
        assert repo.latest_run_id(s) == "0bcdef2123456789abcdef0123456789"
        assert repo.latest_run_id(s, "beta") == "abcdef1123456789abcdef0123456789"
        assert repo.latest_run_id(s, "alpha") == "0bcdef2123456789abcdef0123456789"
        assert repo.latest_run_id(s, "gamma") is None


# --- the CLI, in process, on embedded mode's SQLite store -----------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TASKEXEC_HOME with the runs of IDS in its store (no broker: embedded mode)."""
    for name in list(os.environ):
        if name.startswith("TASKEXEC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TASKEXEC_HOME", str(tmp_path / "home"))
    with Client(Settings()) as client:
        _add(client.store, IDS)
    return tmp_path / "home"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_status_and_results_take_a_prefix(home: Path) -> None:
    r = cli("status", "abcdef1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["run_id"] == "abcdef1123456789abcdef0123456789"
    r = cli("results", "0bcdef", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["run_id"] == "0bcdef2123456789abcdef0123456789"


def test_an_ambiguous_prefix_is_exit_2_naming_the_runs(home: Path) -> None:
    for command in (["status"], ["results"], ["watch"], ["cancel"]):
        r = cli(*command, "abcdef")
        assert r.exit_code == 2, (command, r.output)
        [line] = r.output.splitlines()
        assert line.startswith("taskexec: E001 RUN: run id prefix 'abcdef' is ambiguous"), line
        assert "abcdef0123456789abcdef0123456789" in line and "Traceback" not in r.output


def test_an_unknown_prefix_is_the_not_found_error(home: Path) -> None:
    for command in (["status"], ["results"], ["watch"], ["cancel"]):
        r = cli(*command, "999999")
        assert r.exit_code == 2, (command, r.output)
        assert r.output.strip() == "taskexec: E001 RUN: no run '999999' in the store", r.output


def test_last_takes_the_newest_run_or_the_newest_of_a_plan(home: Path, tmp_path: Path) -> None:
    r = cli("status", "--last", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["run_id"] == "0bcdef2123456789abcdef0123456789"
    r = cli("results", "--last", "--plan", "beta", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["run_id"] == "abcdef1123456789abcdef0123456789"
    plan = tmp_path / "beta.yaml"
    plan.write_text("id: beta\ntasks:\n  - id: a\n    handler: stub\n")
    r = cli("status", "--last", "--plan", str(plan), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["run_id"] == "abcdef1123456789abcdef0123456789"
    r = cli("status", "--last", "--plan", "gamma")
    assert r.exit_code == 2 and "E001 --last: no run of plan 'gamma' in the store" in r.output


def test_cancel_of_an_ended_run_by_prefix_says_its_status(home: Path) -> None:
    with Client(Settings()) as client, client.store.begin() as s:
        assert repo.set_run_status(s, "abcdef1123456789abcdef0123456789", RunStatus.CANCELLED)
    r = cli("cancel", "abcdef1")
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "abcdef1123456789abcdef0123456789: cancelled"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["status"], "E001 RUN: missing RUN"),
        (["status", "abcdef1", "--last"], "E001 --last: give RUN ('abcdef1') or --last, not both"),
        (["status", "abcdef1", "--plan", "alpha"], "E001 --plan: --plan picks the newest run"),
    ],
)
def test_run_and_last_are_given_one_way(home: Path, args: list[str], words: str) -> None:
    r = cli(*args)
    assert r.exit_code == 2 and words in r.output, r.output


def test_every_command_taking_a_run_offers_last() -> None:
    for name in ("status", "results", "watch", "cancel", "resume", "approve", "retry"):
        r = CliRunner().invoke(main, [name, "--help"])
        assert "--last" in r.output and "--plan" in r.output, name


def test_approve_last_task_takes_the_task_as_its_argument(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def approve(self: Client, run_id: str, task_id: str, **kw: object) -> object:
        seen.update(run_id=run_id, task_id=task_id)
        return TaskStatus.SUCCEEDED

    monkeypatch.setattr("taskexec.cli.decide.fleet_or_embedded", lambda what: Settings())
    monkeypatch.setattr(Client, "approve", approve)
    r = cli("approve", "--last", "deploy")
    assert r.exit_code == 0, r.output
    assert seen == {"run_id": "0bcdef2123456789abcdef0123456789", "task_id": "deploy"}
    r = cli("approve", "abcdef0", "gate")
    assert r.exit_code == 0, r.output
    assert seen == {"run_id": "abcdef0123456789abcdef0123456789", "task_id": "gate"}
    assert r.output.startswith("abcdef0123456789abcdef0123456789 gate: approved")


# --- Client methods ------------------------------------------------------------------------


def test_client_methods_take_a_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with harness(tmp_path, monkeypatch, ["stub", "approval"]) as h:
        run_id = h.submit("tasks:\n  - id: a\n    handler: stub\n")
        monkeypatch.setattr(Client, "services", property(lambda self: h.svc))
        with Client(h.svc.settings, app=h.app, store=h.svc.store) as client:
            prefix = run_id[:8]
            assert client.resolve_run(prefix) == run_id
            assert client.last_run() == run_id
            assert client.status(prefix).run_id == run_id
            assert [t.id for t in client.results(prefix)] == ["a"]
            with pytest.raises(ConflictError):  # resolved: the task is not at a gate
                client.approve(prefix, "a")
            assert client.retry(prefix) == []
            assert client.cancel(prefix).value in {"cancelled", "queued", "running"}
            assert client.wait(prefix, timeout=5).run_id == run_id
            for call in (
                client.status,
                client.results,
                client.flow,
                client.cancel,
                client.resume,
                client.retry,
                client.wait,
                lambda r: client.approve(r, "a"),
            ):
                with pytest.raises(RunNotFoundError):
                    call("9" * 8)
                with pytest.raises(TaskexecError, match="no run 'x' in the store"):
                    call("x")


# --- compile in full, --brief ------------------------------------------------------------


def test_compile_lists_every_task_and_brief_the_first_eight(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    models = ", ".join(f"model{k}" for k in range(20))
    plan.write_text(
        "tasks:\n  - id: prep\n    handler: stub\n"
        f"  - id: score\n    handler: stub\n    depends_on: [prep]\n    matrix:\n      params:\n"
        f"        model: [{models}]\n"
    )
    full = CliRunner().invoke(main, ["compile", str(plan)])
    assert full.exit_code == 0, full.output
    assert "…" not in full.output and "(+" not in full.output
    for k in range(20):
        assert f"score[{k}]" in full.output
    assert all(len(line) <= 80 for line in full.output.splitlines() if not line.startswith("  matrix"))
    stage1 = full.output.split("  stage 1: ", 1)[1].split("  matrix", 1)[0]
    assert [w.strip(",") for w in stage1.split()] == [f"score[{k}]" for k in range(20)]
    brief = CliRunner().invoke(main, ["compile", str(plan), "--brief"])
    assert brief.exit_code == 0, brief.output
    line = next(x for x in brief.output.splitlines() if x.startswith("  stage 1: "))
    assert line == "  stage 1: " + ", ".join(f"score[{k}]" for k in range(8)) + ", … (+12)"


# --- examples/producer.py writes its JUnit where it is told ---------------------------------


def _producer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("producer_example", ROOT / "examples" / "producer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_producer_junit_goes_to_the_named_path_or_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = _producer()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JUNIT_XML", raising=False)
    assert producer.junit_path("out/x.xml") == Path("out/x.xml")
    monkeypatch.setenv("JUNIT_XML", str(tmp_path / "env.xml"))
    assert producer.junit_path(None) == tmp_path / "env.xml"
    monkeypatch.delenv("JUNIT_XML")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr("tempfile.tempdir", None)
    made = producer.junit_path(None)
    assert made.parent == temp and made.name.startswith("producer-junit-") and made.suffix == ".xml"
    assert list(tmp_path.glob("*.xml")) == []


def test_gitignore_covers_what_examples_and_embedded_mode_write() -> None:
    names = [".taskexec/taskexec.db", "producer-junit.xml", "report.xml", "timeline.html", "junit.xml"]
    p = subprocess.run(
        ["git", "check-ignore", "--no-index", *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert sorted(p.stdout.split()) == sorted(names), p.stdout + p.stderr


# --- end to end: a real embedded run ------------------------------------------------------


@pytest.mark.integration
def test_run_prints_the_id_first_and_a_prefix_and_last_find_it(tmp_path: Path) -> None:
    from tests.test_embedded import env_for

    home = Path(tmp_path) / "h"
    plan = tmp_path / "plan.yaml"
    plan.write_text("id: ids\ntasks:\n  - id: a\n    handler: stub\n  - id: b\n    handler: stub\n")
    env = env_for(home)

    def taskexec(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "taskexec.cli", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    p = taskexec("run", str(plan))
    assert p.returncode == 0, p.stderr[-2000:]
    first = p.stdout.splitlines()[0]
    run_id = first.split()[0]
    assert len(run_id) == 32 and first == f"{run_id}  ids/default: submitted", p.stdout
    assert f"ids/default {run_id}: succeeded" in p.stdout
    p = taskexec("status", run_id[:6], "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["run_id"] == run_id
    p = taskexec("results", "--last", "--plan", "ids", "--format", "json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["status"] == "succeeded"
    p = taskexec("cancel", "--last")
    assert (p.returncode, p.stdout.strip()) == (0, f"{run_id}: succeeded"), p.stderr
    p = taskexec("run", str(plan), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)[0]["run_id"] != run_id  # JSON only
