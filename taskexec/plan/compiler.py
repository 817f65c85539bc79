"""Compile a plan into run manifests: atomic tasks, resolved dependencies, stages.

Rules (DESIGN.md, "The plan file"):

* an atomic task has a handler and no children; a group has children and no handler;
* a group's ``depends_on`` and policy (timeout, retry, priority, rate_limit) pass to
  every descendant; a dependency on a group or a matrix task means all its atomic tasks;
* a matrix task becomes cases ``id[0]``, ``id[1]``, ... with the case merged over
  ``params`` and kept as the task's ``case`` (so results can name it); a variant's params
  are merged over everything (the variant wins);
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

from collections.abc import Iterator
from itertools import chain
from typing import Any

from pydantic_core import to_json

from taskexec.errors import PlanError, TaskexecError
from taskexec.handlers import output_keys
from taskexec.models import InputRef, MatrixInfo, ParamSpec, RetryPolicy, RunManifest
from taskexec.plan import graph, templates
from taskexec.plan.checks import ParamsChecker
from taskexec.plan.gcpause import full_collections_held
from taskexec.plan.loader import MAX_MANIFEST_BYTES
from taskexec.plan.matrix import expand
from taskexec.plan.params import declare, defaults
from taskexec.plan.schema import Plan
from taskexec.plan.tree import Node, flatten
from taskexec.settings import Settings

__all__ = ["compile_plan"]


#: JSON bytes of a manifest task besides its ids, params and other plan-given parts
#: (field names, stage, timeout, retry policy, priority), and of a manifest besides its
#: tasks: calibrated on the examples and bench/compile.py's plans (estimates 0.97-1.02).
_TASK_BYTES = 250
_MANIFEST_BYTES = 600
_CHUNK = 4096


def _own(node: Node) -> tuple[Any, ...]:
    """What a manifest task takes from its plan task, as is."""
    t = node.task
    return (t.handler, t.params, t.inputs, t.output, t.criteria, t.secret_params, node.path)


def _manifest_bytes(
    nodes: list[Node],
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
        # A case's id twice (its stage, its task) and its values twice (merged into the
        # params, and as the task's `"case": {...}`, 8 bytes besides the values).
        shared += len(listed) * each + sum(2 * len(cid) + 2 * len(to_json(c)) + 8 for cid, c in listed)
        tasks += len(listed)
        if shared > stop:
            break
    return sum(shared + tasks * len(to_json(overlay)) for overlay in variants.values()), tasks


def _check_size(
    nodes: list[Node],
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


def _check_params(
    nodes: list[Node],
    leaves: list[int],
    cases: dict[int, list[tuple[str, dict[str, Any]]]],
    variants: dict[str, dict[str, Any]],
) -> None:
    """Every atomic task's params, as its manifests will hold them (the matrix case and the
    variant merged over them), against its handler's params model; every error reported.

    An error is named once per task and field (the first case or variant that has it).
    """
    checker = ParamsChecker()
    errors: list[TaskexecError] = []
    no_case: list[tuple[str, dict[str, Any]]] = [("", {})]
    # Per handler: None (not checked), or whether a task that sets none of the params its
    # model reads (in itself, a case or a variant) is fine: most tasks of a large plan,
    # passed over here without a call (a stub's `{i: 7}`).
    skip: dict[str, tuple[frozenset[str], bool] | None] = {}
    for n in leaves:
        t = nodes[n].task
        handler = t.handler or ""
        if handler not in skip:
            m = checker.model(handler)
            skip[handler] = None
            if m is not None:
                keys = m.keys or frozenset()
                plain = m.keys is not None and not checker.problems(handler, {}, [])
                plain = plain and all(keys.isdisjoint(overlay) for overlay in variants.values())
                skip[handler] = (keys, plain)
        found = skip[handler]
        if found is None:
            continue
        keys, plain = found
        if plain and n not in cases and not t.secret_params and keys.isdisjoint(t.params):
            continue
        named: set[tuple[str, str]] = set()
        for cid, case in cases.get(n, no_case):
            for name, overlay in variants.items():
                for problem in checker.problems(handler, t.params, t.secret_params, case, overlay):
                    if problem in named:
                        continue
                    named.add(problem)
                    where, message = problem
                    own = t.params, t.secret_params
                    if problem not in checker.problems(handler, *own):
                        by_case = case and problem in checker.problems(handler, *own, case)
                        message += f" (matrix case {cid})" if by_case else f" (variant {name})"
                    errors.append(PlanError(message, path=f"{nodes[n].path}.params{where}"))
    if errors:
        raise TaskexecError.gathered(errors)


def _check_templates_and_paths(
    nodes: list[Node],
    leaves: list[int],
    cases: dict[int, list[tuple[str, dict[str, Any]]]],
    specs: dict[str, ParamSpec],
) -> None:
    """What a compile can tell of each task's templates (names, declared params, its inputs,
    its matrix case) and of its input paths (where the upstream handler's output is known)."""
    errors: list[TaskexecError] = []
    producer = {node.task.output: node for node in nodes if node.task.output is not None}
    for n in leaves:
        node = nodes[n]
        t = node.task
        if t.params and templates.has_templates(t.params):
            case_keys: dict[str, Any] = {}
            for _, case in cases.get(n, []):
                case_keys.update(dict.fromkeys(case))
            names = [e if isinstance(e, str) else e.name for e in t.inputs]
            for where, message in templates.problems(t.params, params=specs, inputs=names, case=case_keys):
                errors.append(PlanError(message, path=f"{node.path}.{where}"))
        for k, entry in enumerate(t.inputs):
            if not isinstance(entry, InputRef) or entry.path is None or entry.from_ not in producer:
                continue
            up = producer[entry.from_].task
            known = output_keys(up.handler or "", up.params)
            first = entry.path.split(".")[0]
            if known is not None and first not in known:
                errors.append(
                    PlanError(
                        f"{first!r} is not in the output of task {up.id!r} "
                        f"({up.handler}: {', '.join(sorted(known))})",
                        path=f"{node.path}.inputs[{k}].path",
                    )
                )
    if errors:
        raise TaskexecError.gathered(errors)


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
    if plan.execution and plan.defaults.execution and plan.execution != plan.defaults.execution:
        raise PlanError("set execution once: at the plan's top level or in defaults", path="execution")
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
    nodes, by_id = flatten(plan, settings)
    leaves, deps = graph.dependencies(nodes, by_id)
    stage = graph.stages(nodes, leaves, deps)
    graph.check_artifacts(nodes, deps, stage)
    specs = declare(plan.params)

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
    _check_params(nodes, leaves, cases, variants)
    _check_templates_and_paths(nodes, leaves, cases, specs)
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
                    task = {
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
                    if found is not None:  # a matrix case: its values, for results to name it
                        task["case"] = case
                    yield task

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
                "execution": plan.execution or plan.defaults.execution or "stages",
                "notify": plan.notify,
                "matrices": matrices,
                "params": specs,
                "param_values": defaults(specs),
            }
        )
        for name, overlay in variants.items()
    ]
