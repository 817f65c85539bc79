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
