"""A task's inputs: the outputs of the upstream tasks that declared those artifacts.

Outputs are read from the store, never passed through the broker: messages carry ids.
The artifact of a matrix task is the list of its cases' outputs, in case order.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from taskexec.models import ManifestTask
from taskexec.store import repository as repo
from taskexec.store.manifests import CompiledRun

__all__ = ["resolve_inputs"]


def resolve_inputs(session: Session, run: CompiledRun, run_id: str, task: ManifestTask) -> dict[str, Any]:
    """Artifact name -> value for every input of ``task``.

    Example: a task with ``inputs: [dataset]`` downstream of ``prepare`` (``output: dataset``)
    gets ``{"dataset": <prepare's output>}``; downstream of a matrix task ``score`` with
    ``output: scores`` it gets ``{"scores": [<score[0]'s output>, <score[1]'s output>, ...]}``.
    """
    if not task.inputs:
        return {}
    wanted = {name: run.producers.get(name, []) for name in task.inputs}
    outputs = repo.outputs_of(session, run_id, sorted({t for ids in wanted.values() for t in ids}))
    inputs: dict[str, Any] = {}
    for name, ids in wanted.items():
        # Plan ids cannot hold brackets, so "x[3]" is always a case of the matrix task x.
        if len(ids) == 1 and "[" not in ids[0]:
            inputs[name] = outputs.get(ids[0])
        else:
            inputs[name] = [outputs.get(i) for i in ids]
    return inputs
