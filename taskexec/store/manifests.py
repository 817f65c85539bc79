"""Each run's manifest, parsed once per process and kept within a byte budget.

Workers read a task's policy, params and dependencies from its run's manifest on every
step; the manifest never changes once stored, so each process parses it once. The cache
is bounded by the manifests' size, not their count: one 100,000-task manifest weighs more
than a thousand small ones (a plan may compile to 64 MiB).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from taskexec.models import ManifestTask, RunManifest
from taskexec.store import repository as repo

__all__ = ["CACHE_BYTES", "CompiledRun", "cached_run", "compiled_run"]

#: Manifest JSON kept parsed per process, in bytes; the least recently used go first (the
#: manifest in use always stays, however large).
CACHE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class CompiledRun:
    """A run's manifest with lookups by task and by artifact."""

    manifest: RunManifest
    tasks: dict[str, ManifestTask] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)  # artifact -> task ids (case order)
    dependents: dict[str, list[str]] = field(default_factory=dict)  # task id -> tasks that depend on it
    size: int = 0  # bytes of the manifest's JSON


class _Cache:
    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.entries: OrderedDict[str, CompiledRun] = OrderedDict()

    def get(self, run_id: str) -> CompiledRun | None:
        found = self.entries.get(run_id)
        if found is not None:
            self.entries.move_to_end(run_id)
        return found

    def put(self, run_id: str, compiled: CompiledRun) -> None:
        self.entries[run_id] = compiled
        self.used += compiled.size
        while self.used > self.budget and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.used -= old.size


_cache = _Cache(CACHE_BYTES)


def cached_run(run_id: str) -> CompiledRun | None:
    """The run's parsed manifest if this process has it, without a transaction."""
    return _cache.get(run_id)


def compiled_run(session: Session, run_id: str) -> CompiledRun:
    """The manifest of a run, parsed once per process (:class:`RunNotFoundError` if none)."""
    found = _cache.get(run_id)
    if found is None:
        found = _parse(repo.get_run(session, run_id).manifest)
        _cache.put(run_id, found)
    return found


def _parse(manifest: dict[str, Any]) -> CompiledRun:
    m = RunManifest.model_validate(manifest)
    producers: dict[str, list[str]] = {}
    dependents: dict[str, list[str]] = {}
    for t in m.tasks:
        if t.output:
            producers.setdefault(t.output, []).append(t.id)
        for d in dict.fromkeys(t.depends_on):
            dependents.setdefault(d, []).append(t.id)
    size = len(json.dumps(manifest, separators=(",", ":")))
    return CompiledRun(m, {t.id: t for t in m.tasks}, producers, dependents, size)
