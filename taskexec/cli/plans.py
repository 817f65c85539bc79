"""``taskexec validate`` and ``taskexec compile``: plans, before anything runs."""

from __future__ import annotations

import json
import sys

import click

from taskexec.cli.common import EXIT_INVALID, manifests, user_errors
from taskexec.errors import HandlerNotAllowedError, PlanError
from taskexec.models import MatrixInfo
from taskexec.settings import Settings

__all__ = ["compile_", "validate"]


@click.command()
@click.argument("plan", type=click.Path(dir_okay=True))
@user_errors
def validate(plan: str) -> None:
    """Load and compile PLAN; exit 0 when it is valid, 2 with its errors when not.

    Every error found is a line with its code and path (at most 50); the first line is the
    first error, as other commands print it.
    """
    try:
        found = manifests(plan, Settings())
    except (PlanError, HandlerNotAllowedError) as e:
        if not e.more:
            raise
        click.echo(f"taskexec: {e}", err=True)
        for other in e.others:
            click.echo(f"taskexec: {other.line()}", err=True)
        if e.omitted:
            click.echo(f"taskexec: … and {e.omitted} more errors", err=True)
        sys.exit(EXIT_INVALID)
    tasks = sum(len(m.tasks) for m in found)
    stages = max(len(m.stages) for m in found)
    click.echo(f"{plan}: valid, {len(found)} variant(s), {tasks} task(s), {stages} stage(s)")


@click.command(name="compile")
@click.argument("plan", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as a JSON list.")
@click.option("--variant", default=None, help="Compile only this variant.")
@click.option("--brief", is_flag=True, help="At most 8 tasks of a stage, then how many more: `… (+N)`.")
@user_errors
def compile_(plan: str, as_json: bool, variant: str | None, brief: bool) -> None:
    """Compile PLAN into run manifests, one per variant: every task of every stage (--brief:
    the first 8 of a stage), or the manifests as JSON."""
    found = manifests(plan, Settings(), variant)
    if as_json:
        # Byte-identical for the same plan: key order follows the models.
        click.echo("[" + ",\n".join(m.model_dump_json() for m in found) + "]")
        return
    for m in found:
        click.echo(f"{m.plan_id} / {m.variant}: {len(m.tasks)} tasks in {len(m.stages)} stages")
        for k, stage in enumerate(m.stages):
            if brief:
                shown = ", ".join(stage[:BRIEF]) + (
                    f", … (+{len(stage) - BRIEF})" if len(stage) > BRIEF else ""
                )
                click.echo(f"  stage {k}: {shown}")
            else:
                click.echo(_stage_lines(k, stage))
        for mx in m.matrices:
            click.echo(f"  matrix {mx.task}: {_matrix_line(mx)}")
        for name, spec in m.params.items():
            shown = "required" if spec.required else f"default {json.dumps(spec.default)}"
            click.echo(f"  param {name}: {spec.type or 'any'}, {shown}")


#: Tasks of a stage ``compile --brief`` shows.
BRIEF = 8
#: Width the full listing wraps at.
WIDTH = 80


def _stage_lines(k: int, stage: list[str]) -> str:
    """``  stage K: a, b, c`` with every task, wrapped at :data:`WIDTH` columns under the first."""
    head = f"  stage {k}: "
    lines, line = [], head
    for i, task in enumerate(stage):
        word = task + ("," if i < len(stage) - 1 else "")
        if line != head and len(line) + 1 + len(word) > WIDTH:
            lines.append(line)
            line = " " * len(head) + word
        else:
            line += ("" if line == head else " ") + word
    lines.append(line)
    return "\n".join(lines)


def _matrix_line(mx: MatrixInfo) -> str:
    """How a matrix expanded, e.g. ``pairwise (strength 3, effort fast), 36 of 72
    combinations, lower bound 36``."""
    if mx.strategy != "pairwise":
        cut = ", cut to max_cases" if mx.truncated else ""
        return f"{mx.strategy}, {mx.cases} of {mx.cartesian} combinations{cut}"
    kind = "pairs" if mx.strength == 2 else f"{mx.strength}-tuples"
    how = f"pairwise (strength {mx.strength}, effort {mx.effort})"
    if mx.truncated:
        covered = f"{mx.pairs_covered}/{mx.pairs_total} {kind}"
        kept = f"kept {mx.cases} of the {mx.cases_needed} needed"
        return f"{how}, {kept}: {covered}, lower bound {mx.lower_bound}"
    return f"{how}, {mx.cases} of {mx.cartesian} combinations, lower bound {mx.lower_bound}"
