"""The documentation's examples work: README plans compile, its commands exist, its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from taskexec.cli import main
from taskexec.plan import load_plan, parse_plan
from taskexec.plan.compiler import compile_plan
from taskexec.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_plan_compiles() -> None:
    [block] = re.findall(r"```yaml\n(.*?)```", README, re.S)
    manifests = compile_plan(parse_plan(block), Settings())
    assert [m.variant for m in manifests] == ["baseline", "new-prompt"]


def test_every_command_the_readme_names_exists() -> None:
    named = set(re.findall(r"`taskexec ([a-z]+)", README))
    assert named, "the README names commands"
    missing = named - set(main.commands)
    assert not missing, f"the README names commands that do not exist: {missing}"


def test_every_relative_link_resolves() -> None:
    for doc in (ROOT / "README.md", ROOT / "deploy" / "README.md", ROOT / "docs" / "reliability.md"):
        for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_compile(path: Path) -> None:
    assert compile_plan(load_plan(path), Settings())
