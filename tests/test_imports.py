"""Every module of ``taskexec`` and ``workers`` imports on its own, first, in a fresh interpreter.

A circular import shows only when a module is the first of its package to be imported
(``workers.validators`` used to fail that way: it imported ``taskexec.errors``, which ran
``taskexec/__init__``, which imported ``workers.validators`` back). One subprocess imports
each module after forgetting every module of both packages, so each import starts fresh
where it matters, without paying an interpreter start per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = r"""
import importlib, json, sys, traceback
failures = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("taskexec", "workers")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def modules() -> list[str]:
    names = []
    for package in ("taskexec", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "migrations" in parts or parts[-1] == "__main__":
                continue
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.integration  # a process per module: the full suite's tier
def test_every_module_imports_first_and_alone() -> None:
    names = modules()
    assert "workers.validators" in names and "taskexec.handlers" in names
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())


def test_the_library_never_imports_the_worker_side_at_module_level() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "taskexec").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.startswith(("from workers", "import workers"))
    ]
    assert not offenders, offenders


HEAVY = ("celery", "kombu", "sqlalchemy", "redis", "jinja2", "httpx", "rich")


def _imported(*args: str) -> set[str]:
    """Top-level packages a ``taskexec`` command imports (``python -X importtime``)."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "taskexec.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in lines}


def test_help_and_validate_import_only_what_they_use() -> None:
    """Start-up counts (issue 20): ``--help`` and ``validate`` never import the fleet's stack."""
    plan = "examples/quickstart.yaml"
    for args in (["--help"], ["validate", plan], ["compile", plan]):
        heavy = _imported(*args) & set(HEAVY)
        assert not heavy, f"taskexec {' '.join(args)} imports {sorted(heavy)}"
    assert "pydantic" not in _imported("--help")


def test_every_command_is_listed_with_its_own_help() -> None:
    """The CLI's table of commands (imported lazily) matches each command's help."""
    import click

    from taskexec import cli

    assert set(cli.COMMANDS) == set(cli.main.list_commands(click.Context(cli.main)))
    for name, (_, line) in cli.COMMANDS.items():
        assert line == cli.load(name).get_short_help_str(limit=500), name
