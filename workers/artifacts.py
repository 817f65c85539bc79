"""A task's inputs: the outputs of the upstream tasks that declared those artifacts.

Outputs are read from the store, never passed through the broker: messages carry ids.
The artifact of a matrix task is the list of its cases' outputs, in case order. An input
``{from: scores, path: json.items, as: items}`` selects a part of the artifact (of each
case's output, for a matrix task's) and renames it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from taskexec.errors import PlanError
from taskexec.models import ManifestTask, artifact_of, input_name
from taskexec.store import repository as repo
from taskexec.store.manifests import CompiledRun
from workers.validators import MISSING, lookup

__all__ = ["resolve_inputs"]


def resolve_inputs(session: Session, run: CompiledRun, run_id: str, task: ManifestTask) -> dict[str, Any]:
    """Input name -> value for every input of ``task``.

    Example: a task with ``inputs: [dataset]`` downstream of ``prepare`` (``output: dataset``)
    gets ``{"dataset": <prepare's output>}``; downstream of a matrix task ``score`` with
    ``output: scores`` it gets ``{"scores": [<score[0]'s output>, <score[1]'s output>, ...]}``.

    Raises:
        PlanError: An input's ``path`` is not in the upstream output (E001, naming both tasks).
    """
    if not task.inputs:
        return {}
    wanted = {artifact_of(e): run.producers.get(artifact_of(e), []) for e in task.inputs}
    outputs = repo.outputs_of(session, run_id, sorted({t for ids in wanted.values() for t in ids}))
    inputs: dict[str, Any] = {}
    for k, entry in enumerate(task.inputs):
        ids = wanted[artifact_of(entry)]
        path = None if isinstance(entry, str) else entry.path
        # Plan ids cannot hold brackets, so "x[3]" is always a case of the matrix task x.
        if len(ids) == 1 and "[" not in ids[0]:
            inputs[input_name(entry)] = _select(outputs.get(ids[0]), path, task, ids[0], k)
        else:
            inputs[input_name(entry)] = [_select(outputs.get(i), path, task, i, k) for i in ids]
    return inputs


def _select(output: Any, path: str | None, task: ManifestTask, upstream: str, k: int) -> Any:
    if path is None:
        return output
    value = lookup(output, path)
    if value is MISSING:
        keys = ", ".join(sorted(output)) if isinstance(output, dict) else type(output).__name__
        raise PlanError(
            f"task {task.id!r}: path {path!r} is not in the output of task {upstream!r} "
            f"(it has: {keys or 'nothing'})",
            path=f"{task.source}.inputs[{k}].path" if task.source else f"inputs[{k}].path",
        )
    return value
