"""A plan's task tree flattened in declaration order: every task with its enclosing group
and the policy (timeout, retry, priority, rate limit) it inherits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from taskexec.errors import PlanError, TaskexecError
from taskexec.models import RetryPolicy
from taskexec.plan.checks import check_node
from taskexec.plan.schema import Plan, PlanTask
from taskexec.settings import Settings

__all__ = ["InheritedPolicy", "Node", "flatten"]


@dataclass(slots=True)
class InheritedPolicy:
    timeout: float = 60.0
    retry: dict[str, Any] = field(default_factory=dict)
    priority: int = 5
    rate_limit: str | None = None
    resolved: RetryPolicy | None = None  # the RetryPolicy of ``retry``, once asked for

    def resolve(self, cache: dict[tuple[tuple[str, Any], ...], RetryPolicy]) -> RetryPolicy:
        """The RetryPolicy of ``retry``; equal retry fields share one RetryPolicy via ``cache``."""
        key = tuple(sorted(self.retry.items()))
        if key not in cache:
            cache[key] = RetryPolicy(**self.retry)
        self.resolved = cache[key]
        return self.resolved

    def under(self, node: PlanTask | Any) -> InheritedPolicy:
        """The policy of ``node``: this one with the fields that ``node`` sets replaced."""
        retry = node.retry
        if node.timeout is None and retry is None and node.priority is None and node.rate_limit is None:
            return self  # shared: most tasks set no policy of their own
        return InheritedPolicy(
            timeout=node.timeout if node.timeout is not None else self.timeout,
            retry={**self.retry, **retry.model_dump(exclude_none=True)} if retry is not None else self.retry,
            priority=node.priority if node.priority is not None else self.priority,
            rate_limit=node.rate_limit if node.rate_limit is not None else self.rate_limit,
        )


@dataclass(slots=True)
class Node:
    """A task of the plan, flattened in declaration (pre-)order, with where it stands."""

    task: PlanTask
    path: str
    parent: int  # index of the enclosing group, -1 at the top level
    policy: InheritedPolicy
    end: int = 0  # one past the last node of its subtree: descendants are index+1 .. end-1


def flatten(plan: Plan, settings: Settings) -> tuple[list[Node], dict[str, int]]:
    nodes: list[Node] = []
    by_id: dict[str, int] = {}
    allowed: dict[str, bool] = {}  # handler name -> allowed; a plan repeats a few names many times
    root = InheritedPolicy().under(plan.defaults)
    # Iterative pre-order walk (a stack of children in reverse): deep plans must not hit
    # the recursion limit, and declaration order decides the order within a stage.
    todo: list[tuple[PlanTask, str, int, InheritedPolicy]] = [
        (t, f"tasks[{i}]", -1, root) for i, t in reversed(list(enumerate(plan.tasks)))
    ]
    # Every task's errors are reported at the end, one error carrying the others.
    errors: list[TaskexecError] = []
    while todo:
        task, path, parent, policy = todo.pop()
        try:
            check_node(task, path, plan, settings, allowed)
        except TaskexecError as e:
            errors.append(e)
        index = len(nodes)
        if task.id in by_id:
            first = nodes[by_id[task.id]].path
            errors.append(PlanError(f"duplicate task id {task.id!r} (first at {first})", path=f"{path}.id"))
        else:
            by_id[task.id] = index
        node = Node(task, path, parent, policy.under(task))
        nodes.append(node)
        if task.tasks:
            todo.extend(
                (c, f"{path}.tasks[{i}]", index, node.policy)
                for i, c in reversed(list(enumerate(task.tasks)))
            )
    if errors:
        raise TaskexecError.gathered(errors)
    # Subtree sizes, children before parents: pre-order puts a subtree in one contiguous run.
    size = [1] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        node.end = i + size[i]
        if node.parent >= 0:
            size[node.parent] += size[i]
    return nodes, by_id
