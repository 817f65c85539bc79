"""The command's contract for bad input and unreachable services: exit 2 or 3, one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.conftest import fresh_database

ROOT = Path(__file__).resolve().parent.parent


def taskexec(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    return subprocess.run(
        [sys.executable, "-m", "taskexec.cli", *args],
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_clear_line(p: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"tasks": [{"id": "a", "handler": "stub"}]}))
    return path


@pytest.mark.integration
def test_an_unreachable_broker_is_exit_3(plan: Path, tmp_path: Path) -> None:
    env = {
        "TASKEXEC_BROKER_URL": "redis://127.0.0.1:1/0",
        "TASKEXEC_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
    }
    assert taskexec("db", "upgrade", env=env).returncode == 0
    one_clear_line(taskexec("submit", str(plan), env=env), 3, "E013")


@pytest.mark.integration
def test_an_unreachable_database_is_exit_3(plan: Path) -> None:
    env = {
        "TASKEXEC_BROKER_URL": "redis://127.0.0.1:6379/15",
        "TASKEXEC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere",
    }
    for args in (("submit", str(plan)), ("status", "abc"), ("runs",), ("db", "upgrade")):
        one_clear_line(taskexec(*args, env=env), 3, "E006")


@pytest.mark.integration
def test_a_database_without_the_schema_says_so(plan: Path) -> None:
    with fresh_database() as url:
        env = {"TASKEXEC_BROKER_URL": "redis://127.0.0.1:6379/15", "TASKEXEC_DATABASE_URL": url}
        one_clear_line(taskexec("status", "abc", env=env), 3, "taskexec db upgrade")


@pytest.mark.integration
def test_bad_arguments_are_exit_2(plan: Path, tmp_path: Path) -> None:
    env = {"TASKEXEC_HOME": str(tmp_path / "home")}
    one_clear_line(taskexec("status", "no-such-run", env=env), 2, "E001")
    one_clear_line(taskexec("results", "no-such-run", "--format", "json", env=env), 2, "E001")
    one_clear_line(taskexec("compile", str(plan), "--variant", "nope", env=env), 2, "unknown variant")
    one_clear_line(taskexec("runs", "--label", "novalue", env=env), 2, "KEY=VALUE")
    one_clear_line(taskexec("submit", str(plan), env=env), 2, "TASKEXEC_BROKER_URL")
    bad_env = {**env, "TASKEXEC_VISIBILITY_TIMEOUT": "soon"}
    one_clear_line(taskexec("validate", str(plan), env=bad_env), 2, "TASKEXEC_VISIBILITY_TIMEOUT")
    p = taskexec("results", "x", "--format", "yaml", env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_every_command_has_help() -> None:
    from taskexec.cli import main

    p = taskexec("--help")  # the installed entry point, once
    assert p.returncode == 0 and "Usage:" in p.stdout
    names = main.list_commands(click.Context(main))  # loaded on use: not in main.commands
    assert len(names) >= 20
    for name in names:  # every command, in process
        r = CliRunner().invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, name


def test_a_worker_warns_of_a_redis_without_password_off_loopback() -> None:
    from taskexec.cli.fleet import exposure_warnings
    from taskexec.settings import Settings

    assert exposure_warnings(Settings(broker_url="redis://127.0.0.1:6379/0")) == []
    assert exposure_warnings(Settings(broker_url="redis://:secret@redis.internal:6379/0")) == []
    [warning] = exposure_warnings(Settings(broker_url="redis://redis.internal:6379/0"))
    assert "redis.internal:6379 has no password" in warning
