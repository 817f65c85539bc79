"""From a plan file to run manifests: the first layer of the data flow (plan → run → store).

* :mod:`~taskexec.plan.schema`: the plan file's strict schema;
* :mod:`~taskexec.plan.loader`: YAML or JSON text into a :class:`Plan`, bounded;
* :mod:`~taskexec.plan.compiler`: a plan into :class:`~taskexec.models.RunManifest`\\ s,
  through :mod:`~taskexec.plan.tree` (the task tree flattened, policies inherited),
  :mod:`~taskexec.plan.checks` (each task's rules) and :mod:`~taskexec.plan.graph`
  (dependencies, stages, artifacts);
* :mod:`~taskexec.plan.matrix`: a parameter matrix into cases, pairwise suites built by
  :mod:`~taskexec.plan.pairwise` and shrunk by :mod:`~taskexec.plan.covering`.

Example:
    >>> plan = parse_plan("tasks: [{id: a, handler: stub}, {id: b, handler: stub, depends_on: [a]}]")
    >>> [m] = compile_plan(plan)
    >>> m.stages
    [['a'], ['b']]
"""

from taskexec.plan.compiler import compile_plan
from taskexec.plan.loader import (
    MAX_ALIAS_EXPANSION,
    MAX_MANIFEST_BYTES,
    MAX_PLAN_BYTES,
    MAX_PLAN_DEPTH,
    load_plan,
    parse_plan,
)
from taskexec.plan.schema import Defaults, Plan, PlanTask, Policy, RetrySpec, plan_error_from

__all__ = [
    "MAX_ALIAS_EXPANSION",
    "MAX_MANIFEST_BYTES",
    "MAX_PLAN_BYTES",
    "MAX_PLAN_DEPTH",
    "Defaults",
    "Plan",
    "PlanTask",
    "Policy",
    "RetrySpec",
    "compile_plan",
    "load_plan",
    "parse_plan",
    "plan_error_from",
]
