"""The documentation's examples work: README plans compile, its commands exist, its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from taskexec.cli import main
from taskexec.plan import load_plan, parse_plan
from taskexec.plan.compiler import compile_plan
from taskexec.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_plans_compile() -> None:
    plan, params = re.findall(r"```yaml\n(.*?)```", README, re.S)
    manifests = compile_plan(parse_plan(plan), Settings())
    assert [m.variant for m in manifests] == ["baseline", "new-prompt"]
    # The params example is examples/params.yaml, which tests/test_params_cli.py runs.
    example = (ROOT / "examples" / "params.yaml").read_text()
    assert params.strip() in example, "the README's params example differs from examples/params.yaml"
    [m] = compile_plan(parse_plan(params), Settings())
    assert m.param_values == {"greeting": "Hello", "repeat": 2}


def test_every_command_the_readme_names_exists() -> None:
    named = set(re.findall(r"`taskexec ([a-z]+)", README))
    assert named, "the README names commands"
    missing = named - set(main.list_commands(click.Context(main)))
    assert not missing, f"the README names commands that do not exist: {missing}"


def test_every_relative_link_resolves() -> None:
    for doc in (ROOT / "README.md", ROOT / "deploy" / "README.md", ROOT / "docs" / "reliability.md"):
        for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_compile(path: Path) -> None:
    assert compile_plan(load_plan(path), Settings())
