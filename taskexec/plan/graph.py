"""A plan's dependency graph: each atomic task's dependencies (groups expanded), its stage
(the longest path), the cycle when there is one, and artifacts that flow only downstream."""

from __future__ import annotations

from collections import deque
from collections.abc import Set as AbstractSet

from taskexec.errors import DependencyCycleError, PlanError, TaskexecError
from taskexec.models import artifact_of, input_name
from taskexec.plan.schema import closest
from taskexec.plan.tree import Node

__all__ = ["check_artifacts", "dependencies", "stages"]

_NO_DEPS: frozenset[int] = frozenset()


def dependencies(nodes: list[Node], by_id: dict[str, int]) -> tuple[list[int], list[list[int]]]:
    """The atomic nodes, and for every node the atomic nodes it depends on, sorted, no duplicates.

    A group's entry is empty: its ``depends_on`` reaches its atomic descendants instead.
    Every unknown id is reported (one error carrying the others), with the closest known id.
    """
    unknown: list[TaskexecError] = []
    leaf = [node.task.tasks is None for node in nodes]
    under: dict[int, list[int]] = {}  # group -> its atomic descendants, built when first needed
    inherited: list[frozenset[int]] = []  # node -> atomic nodes that it and its ancestors depend on
    deps: list[list[int]] = []
    leaves: list[int] = []
    # Each node's own depends_on is checked once, in declaration order: the order in which
    # the first atomic task below each node comes, so an unknown name is the same one reported.
    for i, node in enumerate(nodes):
        found: AbstractSet[int] = inherited[node.parent] if node.parent >= 0 else _NO_DEPS
        if node.task.depends_on:
            grown = set(found)
            for k, dep in enumerate(node.task.depends_on):
                j = by_id.get(dep)
                if j is None:
                    hint = closest(dep, by_id) if len(unknown) < 50 else ""
                    where = f"{node.path}.depends_on[{k}]"
                    unknown.append(PlanError(f"unknown task {dep!r}{hint}", path=where))
                    continue
                if leaf[j]:
                    grown.add(j)
                else:
                    if j not in under:
                        under[j] = [a for a in range(j + 1, nodes[j].end) if leaf[a]]
                    grown.update(under[j])
            found = grown
        if leaf[i]:
            leaves.append(i)
            deps.append(sorted(found))
            inherited.append(_NO_DEPS)
        else:
            deps.append([])
            inherited.append(frozenset(found))
    if unknown:
        raise TaskexecError.gathered(unknown)
    return leaves, deps


def stages(nodes: list[Node], leaves: list[int], deps: list[list[int]]) -> list[int]:
    """Longest-path stage of every atomic node (-1 for groups); raises on a cycle, naming it."""
    stage = [-1] * len(nodes)
    # Plans almost always declare a task after what it depends on: one pass in declaration
    # order stages those; Kahn's algorithm stages the rest (and finds cycles).
    rest: list[int] = []
    for n in leaves:
        s = 0
        for d in deps[n]:
            sd = stage[d]
            if sd < 0:
                rest.append(n)
                break
            if sd >= s:
                s = sd + 1
        else:
            stage[n] = s
    if not rest:
        return stage
    indegree: dict[int, int] = {}
    dependents: dict[int, list[int]] = {}
    for n in rest:
        k = 0
        for d in deps[n]:
            if stage[d] < 0:
                k += 1
                dependents.setdefault(d, []).append(n)
        indegree[n] = k
    ready = deque(n for n in rest if indegree[n] == 0)
    while ready:
        n = ready.popleft()
        stage[n] = 1 + max((stage[d] for d in deps[n]), default=-1)
        for m in dependents.get(n, ()):
            indegree[m] -= 1
            if indegree[m] == 0:
                ready.append(m)
    if any(stage[n] < 0 for n in rest):
        raise _cycle_error(nodes, deps, stage, rest)
    return stage


def _cycle_error(nodes: list[Node], deps: list[list[int]], stage: list[int], rest: list[int]) -> PlanError:
    # Every node left over lies on or behind a cycle: walking dependencies among them
    # from any of them must revisit a node; the revisited stretch is a cycle.
    left = sorted(n for n in rest if stage[n] < 0)
    seen: dict[int, int] = {}
    walk: list[int] = []
    n = left[0]
    while n not in seen:
        seen[n] = len(walk)
        walk.append(n)
        n = next(d for d in deps[n] if stage[d] < 0)
    cycle = walk[seen[n] :]
    # Print it in the direction of the arrows "x depends on y": x -> y -> x.
    names = [nodes[i].task.id for i in cycle] + [nodes[cycle[0]].task.id]
    return DependencyCycleError(names, path=nodes[cycle[0]].path + ".depends_on")


def check_artifacts(nodes: list[Node], deps: list[list[int]], stage: list[int]) -> None:
    """Each artifact has one producer, upstream of every task that reads it; every error is
    reported (one error carrying the others), an unknown name with the closest known one."""
    errors: list[TaskexecError] = []
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        out = node.task.output
        if out is None:
            continue
        if out in producer:
            other = nodes[producer[out]]
            errors.append(
                PlanError(
                    f"artifact {out!r} is already the output of task {other.task.id!r} ({other.path})",
                    path=f"{node.path}.output",
                )
            )
            continue
        producer[out] = i
    for i, node in enumerate(nodes):
        received: set[str] = set()
        for k, entry in enumerate(node.task.inputs):
            where = f"{node.path}.inputs[{k}]"
            name = artifact_of(entry)
            if input_name(entry) in received:
                errors.append(
                    PlanError(f"two inputs named {input_name(entry)!r}: rename one with 'as'", path=where)
                )
            received.add(input_name(entry))
            if name not in producer:
                hint = closest(name, producer) if len(errors) < 50 else ""
                errors.append(
                    PlanError(f"artifact {name!r} is not produced by any upstream task{hint}", path=where)
                )
                continue
            src = producer[name]
            if not _upstream(src, i, deps, stage):
                errors.append(
                    PlanError(
                        f"artifact {name!r} is produced by task {nodes[src].task.id!r}, "
                        f"which is not upstream of this task",
                        path=where,
                    )
                )
    if errors:
        raise TaskexecError.gathered(errors)


def _upstream(src: int, dst: int, deps: list[list[int]], stage: list[int]) -> bool:
    if stage[src] >= stage[dst]:
        return False
    seen = {dst}
    todo = [dst]
    while todo:
        for d in deps[todo.pop()]:
            if d == src:
                return True
            # A node at or below the producer's stage cannot have the producer upstream.
            if d not in seen and stage[d] > stage[src]:
                seen.add(d)
                todo.append(d)
    return False
