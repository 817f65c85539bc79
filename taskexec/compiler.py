"""Compile a plan into run manifests: atomic tasks, resolved dependencies, stages.

Rules (DESIGN.md, "The plan file"):

* an atomic task has a handler and no children; a group has children and no handler;
* a group's ``depends_on`` and policy (timeout, retry, priority, rate_limit) pass to
  every descendant; a dependency on a group or a matrix task means all its atomic tasks;
* a matrix task becomes cases ``id[0]``, ``id[1]``, ... with the case merged over
  ``params``; a variant's params are merged over everything (the variant wins);
* stage = 0 without dependencies, else 1 + the highest stage of the dependencies;
* an input artifact must be the ``output`` of an upstream task;
* the manifests, as JSON, stay under :data:`~taskexec.plan.MAX_MANIFEST_BYTES`: matrices
  and variants multiply a plan, and every worker process reads its run's manifest.

Nothing is compiled when the plan has any error. The same plan always compiles to the
same manifests, byte for byte.

Example:
    >>> from taskexec.plan import parse_plan
    >>> [m] = compile_plan(parse_plan("tasks: [{id: a, handler: stub}]"))
    >>> m.stages
    [['a']]
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from pydantic_core import to_json

from taskexec.errors import DependencyCycleError, HandlerNotAllowedError, PlanError
from taskexec.matrix import expand
from taskexec.models import MatrixInfo, RetryPolicy, RunManifest
from taskexec.plan import MAX_MANIFEST_BYTES, Plan, PlanTask, full_collections_held
from taskexec.settings import Settings

__all__ = ["compile_plan"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OWN_SETTING = "${} is a setting of the worker (TASKEXEC_*), never a secret a plan may read"
_NO_DEPS: frozenset[int] = frozenset()


@dataclass(slots=True)
class _Policy:
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

    def under(self, node: PlanTask | Any) -> _Policy:
        """The policy of ``node``: this one with the fields that ``node`` sets replaced."""
        retry = node.retry
        if node.timeout is None and retry is None and node.priority is None and node.rate_limit is None:
            return self  # shared: most tasks set no policy of their own
        return _Policy(
            timeout=node.timeout if node.timeout is not None else self.timeout,
            retry={**self.retry, **retry.model_dump(exclude_none=True)} if retry is not None else self.retry,
            priority=node.priority if node.priority is not None else self.priority,
            rate_limit=node.rate_limit if node.rate_limit is not None else self.rate_limit,
        )


@dataclass(slots=True)
class _Node:
    """A task of the plan, flattened in declaration (pre-)order, with where it stands."""

    task: PlanTask
    path: str
    parent: int  # index of the enclosing group, -1 at the top level
    policy: _Policy
    end: int = 0  # one past the last node of its subtree: descendants are index+1 .. end-1


def _flatten(plan: Plan, settings: Settings) -> tuple[list[_Node], dict[str, int]]:
    nodes: list[_Node] = []
    by_id: dict[str, int] = {}
    allowed: dict[str, bool] = {}  # handler name -> allowed; a plan repeats a few names many times
    root = _Policy().under(plan.defaults)
    # Iterative pre-order walk (a stack of children in reverse): deep plans must not hit
    # the recursion limit, and declaration order decides the order within a stage.
    todo: list[tuple[PlanTask, str, int, _Policy]] = [
        (t, f"tasks[{i}]", -1, root) for i, t in reversed(list(enumerate(plan.tasks)))
    ]
    while todo:
        task, path, parent, policy = todo.pop()
        _check_node(task, path, plan, settings, allowed)
        if task.id in by_id:
            first = nodes[by_id[task.id]].path
            raise PlanError(f"duplicate task id {task.id!r} (first at {first})", path=f"{path}.id")
        index = len(nodes)
        node = _Node(task, path, parent, policy.under(task))
        nodes.append(node)
        by_id[task.id] = index
        if task.tasks:
            todo.extend(
                (c, f"{path}.tasks[{i}]", index, node.policy)
                for i, c in reversed(list(enumerate(task.tasks)))
            )
    # Subtree sizes, children before parents: pre-order puts a subtree in one contiguous run.
    size = [1] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        node.end = i + size[i]
        if node.parent >= 0:
            size[node.parent] += size[i]
    return nodes, by_id


def _check_node(task: PlanTask, path: str, plan: Plan, settings: Settings, allowed: dict[str, bool]) -> None:
    if task.tasks is not None:
        if not task.tasks:
            raise PlanError("a group needs at least one task", path=f"{path}.tasks")
        for key in ("handler", "matrix", "output"):
            if getattr(task, key) is not None:
                raise PlanError(f"a group (a task with 'tasks') has no {key}", path=f"{path}.{key}")
        for key in ("params", "inputs", "criteria", "secret_params"):
            if getattr(task, key):
                name = "validate" if key == "criteria" else key
                raise PlanError(f"a group (a task with 'tasks') has no {name}", path=f"{path}.{name}")
        return
    handler = task.handler
    if handler is None:
        raise PlanError("an atomic task needs a handler (or child 'tasks')", path=f"{path}.handler")
    ok = allowed.get(handler)
    if ok is None:
        ok = allowed[handler] = settings.handler_allowed(handler)
    if not ok:
        names = ", ".join(settings.allowed_handlers)
        raise HandlerNotAllowedError(
            f"handler {handler!r} is not allowed here (allowed: {names})", path=f"{path}.handler"
        )
    if task.timeout is not None and task.timeout > settings.max_task_timeout:
        raise PlanError(
            f"timeout {task.timeout:g} s is above the operator's maximum of {settings.max_task_timeout:g} s",
            path=f"{path}.timeout",
        )
    if task.rate_limit is not None and task.rate_limit not in plan.rate_limits:
        raise PlanError(f"unknown rate limit {task.rate_limit!r}", path=f"{path}.rate_limit")
    if task.params or task.secret_params:
        _check_secrets(task, path)


def _names_a_secret(ref: object) -> bool:
    # A worker's own settings (TASKEXEC_*) are never secrets: refused here already, so
    # that the plan's author hears it at validate time, not from a failed task.
    return isinstance(ref, str) and bool(_ENV_NAME.match(ref)) and not ref.startswith("TASKEXEC_")


def _bad_secret(value: Any) -> tuple[list[str], Any] | None:
    """A malformed ``{secret: ...}`` in ``value``: its path parts, innermost first, and the value."""
    if isinstance(value, dict):
        if "secret" in value and len(value) == 1:
            ref = value["secret"]
            return None if _names_a_secret(ref) else ([], ref)
        items: Any = value.items()
        fmt = ".{}"
    elif isinstance(value, list):
        items = enumerate(value)
        fmt = "[{}]"
    else:
        return None
    for k, v in items:
        # Scalars hold no secret: skip the call, most params are scalars.
        if isinstance(v, (dict, list)) and (found := _bad_secret(v)) is not None:
            found[0].append(fmt.format(k))
            return found
    return None


def _check_secrets(task: PlanTask, path: str) -> None:
    """Secret params name environment variables; a literal value would be stored with the run."""
    found = _bad_secret(task.params)
    if found is not None:
        parts, ref = found
        raise PlanError(
            _OWN_SETTING.format(ref)
            if isinstance(ref, str) and ref.startswith("TASKEXEC_")
            else f"a secret is {{secret: ENV_NAME}}, the name of a worker environment variable, not {ref!r}",
            path=f"{path}.params" + "".join(reversed(parts)),
        )
    for k, name in enumerate(task.secret_params):
        ref = task.params.get(name, name.upper())
        if isinstance(ref, dict) and set(ref) == {"secret"}:
            continue
        if isinstance(ref, str) and ref.startswith("TASKEXEC_"):
            raise PlanError(_OWN_SETTING.format(ref), path=f"{path}.secret_params[{k}]")
        if not isinstance(ref, str) or not _ENV_NAME.match(ref):
            raise PlanError(
                f"secret param {name!r} must name a worker environment variable (e.g. OPENAI_API_KEY), "
                "not hold the secret: the plan is stored with the run",
                path=f"{path}.secret_params[{k}]",
            )


def _dependencies(nodes: list[_Node], by_id: dict[str, int]) -> tuple[list[int], list[list[int]]]:
    """The atomic nodes, and for every node the atomic nodes it depends on, sorted, no duplicates.

    A group's entry is empty: its ``depends_on`` reaches its atomic descendants instead.
    """
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
                    raise PlanError(f"unknown task {dep!r}", path=f"{node.path}.depends_on[{k}]")
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
    return leaves, deps


def _stages(nodes: list[_Node], leaves: list[int], deps: list[list[int]]) -> list[int]:
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


def _cycle_error(nodes: list[_Node], deps: list[list[int]], stage: list[int], rest: list[int]) -> PlanError:
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


def _check_artifacts(nodes: list[_Node], deps: list[list[int]], stage: list[int]) -> None:
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        out = node.task.output
        if out is None:
            continue
        if out in producer:
            other = nodes[producer[out]]
            raise PlanError(
                f"artifact {out!r} is already the output of task {other.task.id!r} ({other.path})",
                path=f"{node.path}.output",
            )
        producer[out] = i
    for i, node in enumerate(nodes):
        for k, name in enumerate(node.task.inputs):
            where = f"{node.path}.inputs[{k}]"
            if name not in producer:
                raise PlanError(f"artifact {name!r} is not produced by any upstream task", path=where)
            src = producer[name]
            if not _upstream(src, i, deps, stage):
                raise PlanError(
                    f"artifact {name!r} is produced by task {nodes[src].task.id!r}, "
                    f"which is not upstream of this task",
                    path=where,
                )


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


#: JSON bytes of a manifest task besides its ids, params and other plan-given parts
#: (field names, stage, timeout, retry policy, priority), and of a manifest besides its
#: tasks: calibrated on the examples and bench/compile.py's plans (estimates 0.97-1.02).
_TASK_BYTES = 250
_MANIFEST_BYTES = 600
_CHUNK = 4096


def _own(node: _Node) -> tuple[Any, ...]:
    """What a manifest task takes from its plan task, as is."""
    t = node.task
    return (t.handler, t.params, t.inputs, t.output, t.criteria, t.secret_params, node.path)


def _manifest_bytes(
    nodes: list[_Node],
    leaves: list[int],
    deps: list[list[int]],
    cases: dict[int, list[tuple[str, dict[str, Any]]]],
    variants: dict[str, dict[str, Any]],
    stop: int,
) -> tuple[int, int]:
    """The manifests' JSON bytes, estimated from their parts (or more than ``stop``), and tasks per manifest.

    Estimated before anything is built: a matrix task's cases each carry its params and
    its dependencies' ids, so ten thousand cases downstream of ten thousand cases are a
    hundred million ids, too many to build in order to measure them. Serializing built
    manifests would also cost a sixth of the compile time of a 100,000-task plan.
    """
    # JSON bytes of each atomic node's task ids, as one dependency: `"id", ` per case.
    id_bytes = [len(node.task.id) + 3 for node in nodes]
    for n, listed in cases.items():
        id_bytes[n] = sum(len(cid) + 3 for cid, _ in listed)
    shared = _MANIFEST_BYTES  # bytes of one manifest without the variant's overlay
    # Tasks without a matrix in chunks, each part summed at C speed (one loop in Python
    # per task cost as much as serializing the manifests).
    plain = [n for n in leaves if n not in cases]
    for k in range(0, len(plain), _CHUNK):
        chunk = plain[k : k + _CHUNK]
        shared += len(chunk) * _TASK_BYTES + 2 * sum(len(nodes[n].task.id) for n in chunk)
        shared += len(to_json([_own(nodes[n]) for n in chunk]))
        shared += sum(map(id_bytes.__getitem__, chain.from_iterable(deps[n] for n in chunk)))
        if shared > stop:
            return shared, len(plain)
    tasks = len(plain)
    for n, listed in cases.items():
        each = _TASK_BYTES + len(to_json(_own(nodes[n]))) + sum(map(id_bytes.__getitem__, deps[n]))
        shared += len(listed) * each + sum(2 * len(cid) + len(to_json(c)) for cid, c in listed)
        tasks += len(listed)
        if shared > stop:
            break
    return sum(shared + tasks * len(to_json(overlay)) for overlay in variants.values()), tasks


def _check_size(
    nodes: list[_Node],
    leaves: list[int],
    deps: list[list[int]],
    cases: dict[int, list[tuple[str, dict[str, Any]]]],
    variants: dict[str, dict[str, Any]],
) -> None:
    """Refuse a plan whose manifests would take more than :data:`MAX_MANIFEST_BYTES` as JSON."""
    total, tasks = _manifest_bytes(nodes, leaves, deps, cases, variants, MAX_MANIFEST_BYTES)
    if total > MAX_MANIFEST_BYTES:
        mib = 1024 * 1024
        raise PlanError(
            f"the compiled plan would take {total / mib:,.0f} MiB or more as JSON ({tasks:,} or more tasks "
            f"per variant, {len(variants)} variant(s)), above the limit of {MAX_MANIFEST_BYTES // mib} MiB: "
            "matrices and variants multiply a plan's tasks, params and dependencies",
            path="tasks",
        )


def compile_plan(
    plan: Plan, settings: Settings | None = None, *, variant: str | None = None
) -> list[RunManifest]:
    """Compile a plan into one manifest per variant (or only ``variant``).

    Args:
        plan: A loaded plan (:func:`taskexec.load_plan`).
        settings: Decides which handlers are allowed; default from the environment.
        variant: Compile only this variant.

    Raises:
        PlanError: The plan has an error (E001), naming the field path.
        HandlerNotAllowedError: A task names a handler the operator does not allow (E010).
    """
    settings = settings or Settings()
    if plan.defaults.rate_limit is not None and plan.defaults.rate_limit not in plan.rate_limits:
        raise PlanError(f"unknown rate limit {plan.defaults.rate_limit!r}", path="defaults.rate_limit")
    if plan.concurrency and plan.defaults.concurrency and plan.concurrency != plan.defaults.concurrency:
        raise PlanError("set concurrency once: at the plan's top level or in defaults", path="concurrency")
    variants = plan.variants or {"default": {}}
    if variant is not None:
        if variant not in variants:
            raise PlanError(
                f"unknown variant {variant!r} (variants: {', '.join(variants)})", path="--variant"
            )
        variants = {variant: variants[variant]}
    with full_collections_held:
        return _compile(plan, settings, variants)


def _compile(plan: Plan, settings: Settings, variants: dict[str, dict[str, Any]]) -> list[RunManifest]:
    nodes, by_id = _flatten(plan, settings)
    leaves, deps = _dependencies(nodes, by_id)
    stage = _stages(nodes, leaves, deps)
    _check_artifacts(nodes, deps, stage)

    # Matrix cases: atomic node -> list of (task id, case params), computed once.
    cases: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    matrices: list[MatrixInfo] = []
    for n in leaves:
        task = nodes[n].task
        if task.matrix is None:
            continue
        try:
            exp = expand(task.matrix)
        except ValueError as e:
            raise PlanError(str(e), path=f"{nodes[n].path}.matrix") from None
        cases[n] = [(f"{task.id}[{i}]", c) for i, c in enumerate(exp.cases)]
        matrices.append(
            MatrixInfo(
                task=task.id,
                strategy=task.matrix.strategy,
                cases=len(exp.cases),
                cartesian=exp.cartesian,
                cases_needed=exp.cases_needed,
                pairs_total=exp.pairs_total,
                pairs_covered=exp.pairs_covered,
                truncated=exp.truncated,
                strength=exp.strength or None,
                effort=task.matrix.effort if task.matrix.strategy == "pairwise" else None,
                lower_bound=exp.lower_bound,
            )
        )
    names = [node.task.id for node in nodes]
    _check_size(nodes, leaves, deps, cases, variants)
    case_ids = {n: [cid for cid, _ in found] for n, found in cases.items()}

    def ids(n: int) -> list[str]:
        found = case_ids.get(n)
        return found if found is not None else [names[n]]

    # Atomic nodes in stage order, declaration order within a stage (a bucket sort).
    by_stage: list[list[int]] = [[] for _ in range(1 + max(stage[n] for n in leaves))]
    for n in leaves:
        by_stage[stage[n]].append(n)
    if case_ids:
        stages = [[cid for n in bucket for cid in ids(n)] for bucket in by_stage]
    else:
        stages = [[names[n] for n in bucket] for bucket in by_stage]
    retry_cache: dict[tuple[tuple[str, Any], ...], RetryPolicy] = {}
    no_case: dict[str, Any] = {}

    def tasks(overlay: dict[str, Any]) -> Iterator[dict[str, Any]]:
        # Plain dicts, validated into ManifestTasks by RunManifest in one call: faster than
        # one model constructor call per task, and only one dict is alive at a time. The
        # validation copies every list and dict, so passing the plan's own is safe.
        for bucket in by_stage:
            for n in bucket:
                node = nodes[n]
                t = node.task
                pol = node.policy
                retry = pol.resolved or pol.resolve(retry_cache)
                ds = deps[n]
                dep_ids = [cid for d in ds for cid in ids(d)] if case_ids else [names[d] for d in ds]
                found = cases.get(n)
                for cid, case in found if found is not None else ((t.id, no_case),):
                    yield {
                        "id": cid,
                        "stage": stage[n],
                        "depends_on": dep_ids,
                        "handler": t.handler or "",
                        "params": {**t.params, **case, **overlay} if case or overlay else t.params,
                        "inputs": t.inputs,
                        "output": t.output,
                        "timeout": pol.timeout,
                        "retry": retry,
                        "rate_limit": pol.rate_limit,
                        "priority": pol.priority,
                        "validate_": t.criteria,
                        "secret_params": t.secret_params,
                        "source": node.path,
                    }

    return [
        RunManifest.model_validate(
            {
                "plan_id": plan.plan_id,
                "plan_name": plan.name,
                "variant": name,
                "stages": stages,
                "tasks": tasks(overlay),
                "rate_limits": plan.rate_limits,
                "stop": plan.stop,
                "concurrency": plan.concurrency or plan.defaults.concurrency,
                "notify": plan.notify,
                "matrices": matrices,
            }
        )
        for name, overlay in variants.items()
    ]
