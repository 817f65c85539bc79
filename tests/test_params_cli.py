"""Issue 16 end to end: run parameters, templates and artifact paths on real workers (the
embedded fleet through the CLI, and a PostgreSQL fleet through the Client), the HTTP matrix
example against a local server, and ``retry``/``resume`` of an embedded run that has ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskexec import Client, Settings, load_plan
from taskexec.errors import PlanError
from tests.conftest import ROOT, Fleet

pytestmark = pytest.mark.integration

sys.path.insert(0, str(ROOT / "examples"))
from http_server import serve  # noqa: E402


def taskexec(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    return subprocess.run(
        [sys.executable, "-m", "taskexec.cli", *args],
        env={**base, "PYTHONPATH": str(ROOT), "TASKEXEC_HOME": str(home), **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def status(home: Path, run: str = "--last") -> dict[str, Any]:
    p = taskexec(home, "status", run, "--json")
    data: dict[str, Any] = json.loads(p.stdout)
    return data


def test_params_templates_and_paths_embedded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "p.yaml").write_text("greeting: Hi\nrepeat: 5\n")
    p = taskexec(
        home, "run", "examples/params.yaml", "--params-file", str(tmp_path / "p.yaml"), "--param", "repeat=3"
    )
    assert p.returncode == 0, p.stderr
    result = status(home)
    assert result["params"] == {"greeting": "Hi", "repeat": 3}  # --param wins over the file
    tasks = {t["id"]: t for t in result["tasks"]}
    assert tasks["greet[1]"]["output"]["stdout"] == "Hi (fr, x3): Ada, Grace\n"
    # The rendered params are stored with the task; the manifest keeps the template.
    assert tasks["greet[1]"]["params"]["argv"] == ["echo", "Hi (fr, x3): Ada, Grace"]
    assert tasks["fetch"]["output"] == {"items": [{"name": "Ada"}, {"name": "Grace"}]}  # parse_json
    compiled = json.loads(taskexec(home, "compile", "examples/params.yaml", "--json").stdout)
    assert "{{ params.greeting }}" in compiled[0]["tasks"][1]["params"]["argv"][1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "repeat=x"], "E001 params.repeat: must be an int, not 'x'"),
        (["--param", "greting=Hi"], "E001 params.greting: unknown param (did you mean greeting?)"),
        (["--param", "repeat"], "E001 --param: 'repeat' is not NAME=VALUE"),
        (["--params-file", "/no/such/file"], "E001 --params-file /no/such/file: cannot read"),
    ],
)
def test_bad_params_are_one_line_exit_2_before_anything_runs(
    tmp_path: Path, args: list[str], message: str
) -> None:
    p = taskexec(tmp_path / "home", "run", "examples/params.yaml", *args)
    assert p.returncode == 2 and p.stderr.strip().startswith(f"taskexec: {message}"), p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()  # nothing started, nothing stored


@pytest.fixture
def forecast_server() -> Iterator[str]:
    server = serve(0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_http_matrix_example_calls_each_case_url(tmp_path: Path, forecast_server: str) -> None:
    home = tmp_path / "home"
    p = taskexec(
        home,
        "run",
        "examples/http-matrix.yaml",
        "--param",
        f"base_url={forecast_server}",
        env={"TASKEXEC_HTTP_ALLOW": "127.0.0.1"},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    tasks = {t["id"]: t for t in status(home)["tasks"]}
    cases = [tasks[f"forecast[{i}]"] for i in range(6)]
    assert [(c["case"]["city"], c["case"]["unit"]) for c in cases] == [
        (city, unit) for city in ("paris", "tokyo", "lima") for unit in ("c", "f")
    ]
    for c in cases:  # each case called its own URL, and the server answered for that city
        assert (
            c["params"]["url"] == f"{forecast_server}/forecast/{c['case']['city']}?unit={c['case']['unit']}"
        )
        assert c["output"]["json"]["city"] == c["case"]["city"]
    assert tasks["summary"]["output"]["cases"] == 6


def test_retry_and_resume_of_an_ended_embedded_run_start_the_embedded_worker(tmp_path: Path) -> None:
    home, flag = tmp_path / "home", tmp_path / "ok"
    plan = tmp_path / "f.yaml"
    plan.write_text(
        f"""
tasks:
  - {{id: a, handler: shell, params: {{argv: [test, -e, "{flag}"]}}, retry: {{max_attempts: 1}}}}
  - {{id: b, handler: stub, depends_on: [a]}}
"""
    )
    first = taskexec(home, "run", str(plan))
    assert first.returncode == 1
    run_id = first.stdout.split()[0]
    flag.touch()
    again = taskexec(home, "retry", run_id[:8])
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{run_id}: 2 task(s) run again: a, b" in again.stdout
    result = status(home, run_id)
    assert result["status"] == "succeeded"
    assert {t["id"]: (t["status"], t["attempts"]) for t in result["tasks"]} == {
        "a": ("succeeded", 2),  # the failed attempt is kept: attempt numbers go on
        "b": ("succeeded", 1),
    }
    nothing = taskexec(home, "retry", "--last")
    assert nothing.returncode == 0 and "nothing to run again" in nothing.stdout
    ended = taskexec(home, "resume", "--last")
    assert ended.returncode == 0 and "the run has ended (succeeded); nothing to resume" in ended.stdout


def test_client_submit_params_on_a_fleet(fleet: Fleet) -> None:
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    plan = load_plan(ROOT / "examples" / "params.yaml")
    with Client(settings) as client:
        with pytest.raises(PlanError, match=r"E001 params.repeat: must be an int"):
            client.submit(plan, params={"repeat": "three"})
        result = client.submit(plan, params={"greeting": "Bonjour"}).wait(timeout=120)
        assert result.succeeded and result.params == {"greeting": "Bonjour", "repeat": 2}
        outputs = {t.id: t.output for t in result.tasks}
        assert outputs["greet[0]"]["stdout"] == "Bonjour (en, x2): Ada, Grace\n"


@pytest.fixture
def secret_fleet(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet({**fleet_env, "CANARY_SECRET": "canary-5ecret-9d41"}, tmp_path)
    try:
        f.start_many(("executor,validator", 2, "exec"))
        yield f
    finally:
        f.stop()


def test_a_secret_is_never_rendered_into_stored_params(secret_fleet: Fleet) -> None:
    settings = secret_fleet.settings()
    assert isinstance(settings, Settings)
    plan = {
        "params": {"label": "nightly"},
        "tasks": [
            {
                "id": "call",
                "handler": "shell",
                "params": {
                    "argv": ["python3", "-c", "import os; print(os.environ['TOK'], os.environ['LABEL'])"],
                    "env": {
                        "TOK": {"secret": "CANARY_SECRET"},
                        "LABEL": "{{ params.label }}-{{ run.id[:4] }}",
                    },
                },
            }
        ],
    }
    from taskexec import parse_plan

    with Client(settings) as client:
        result = client.submit(parse_plan(plan)).wait(timeout=120)
        [task] = result.tasks
        assert result.succeeded, task.error_message
        assert task.output is not None and task.output["stdout"] == f"*** nightly-{result.run_id[:4]}\n"
        assert task.params is not None
        assert task.params["env"] == {
            "TOK": {"secret": "CANARY_SECRET"},
            "LABEL": f"nightly-{result.run_id[:4]}",
        }
        assert "canary-5ecret-9d41" not in json.dumps(result.model_dump(mode="json"))
    # A template cannot name a secret: only params, case, inputs, run and task exist.
    with pytest.raises(PlanError, match=r"unknown name 'CANARY_SECRET'"):
        parse_and_compile = {
            "tasks": [{"id": "x", "handler": "stub", "params": {"o": "{{ CANARY_SECRET }}"}}]
        }
        from taskexec import compile_plan

        compile_plan(parse_plan(parse_and_compile))
