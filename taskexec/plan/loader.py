"""Loading a plan from YAML or JSON text, bounded, into the schema's :class:`Plan`.

Every error is a :class:`~taskexec.errors.PlanError` (E001) naming the field path, e.g.
``E001 tasks[1].tasks[0].timeout: must be greater than 0``.

A plan is input from whoever may submit one, so loading is bounded before anything is
built from it: the file's size (:data:`MAX_PLAN_BYTES`), its nesting
(:data:`MAX_PLAN_DEPTH`), and what YAML aliases expand to (:data:`MAX_ALIAS_EXPANSION`:
a few hundred bytes of nested aliases, a "billion laughs", stand for gigabytes).

Example:
    >>> plan = parse_plan('tasks: [{id: hello, handler: stub}]')
    >>> plan.tasks[0].id
    'hello'
"""

from __future__ import annotations

import itertools
import json
import re
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from taskexec.errors import PlanError
from taskexec.plan.gcpause import full_collections_held
from taskexec.plan.schema import Plan, plan_error_from

__all__ = [
    "MAX_ALIAS_EXPANSION",
    "MAX_MANIFEST_BYTES",
    "MAX_PLAN_BYTES",
    "MAX_PLAN_DEPTH",
    "load_plan",
    "parse_plan",
]

#: Plans larger than this are refused before parsing: a plan is a description, not data.
MAX_PLAN_BYTES = 10 * 1024 * 1024
#: Deepest nesting of lists and mappings in a plan file. Far deeper than any description
#: needs, far below where recursive code (parsers, the schema, JSON encoders) overflows:
#: 1,000 nested JSON lists made ``json.loads`` raise RecursionError.
MAX_PLAN_DEPTH = 100
#: What YAML aliases may add to a plan once expanded, counted as the JSON text they stand
#: for (an alias of a 1 KiB mapping used 10 times adds 10 KiB): no more than a plan file
#: may hold. Refused at the alias that crosses it, before anything is built.
MAX_ALIAS_EXPANSION = MAX_PLAN_BYTES
#: Largest compiled plan: the JSON of all its manifests (matrices and variants multiply a
#: plan's tasks and params). Stored with each run and read by every worker process.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


try:
    from yaml._yaml import CParser as _EventSource
except ImportError:  # pragma: no cover - PyYAML built without libyaml: its own parser
    _EventSource = yaml.SafeLoader  # type: ignore[assignment,misc]


def _too_deep(origin: str) -> PlanError:
    return PlanError(
        f"the plan nests lists and mappings more than {MAX_PLAN_DEPTH} levels deep (the limit)", path=origin
    )


class _BoundedLoader(Composer, SafeConstructor, Resolver):
    """PyYAML's safe loading, bounded: nesting depth, alias expansion, no recursive aliases.

    PyYAML builds an alias as a reference to the anchored object, so a billion laughs
    costs nothing to load: it blows up later, in whatever walks or serializes the plan
    (the compiler's checks, the manifest's JSON: 39 MB stored, workers grown to 1 GB).
    So the composer measures every node as the JSON text it stands for, keeps the size
    of anchored ones, and adds it up at every alias: refused at the alias that crosses
    :data:`MAX_ALIAS_EXPANSION`, in microseconds.

    The events come from libyaml's parser when PyYAML has it (its wheels do): PyYAML's
    own scanner spends a second in a few thousand nested ``[`` (every open flow level is
    checked at every token), libyaml milliseconds; and the whole load is 2.5 times faster
    (measured on a 3.5 MB plan; the constructor, in Python, is the rest).
    """

    def __init__(self, stream: str, origin: str) -> None:
        self._events: Any = _EventSource(stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.origin = origin
        self._open: list[int] = []  # the size so far of each collection being composed
        self._anchored: dict[int, int] = {}  # id(node) -> size, anchored nodes only
        self._expanded = 0  # what aliases added

    def check_event(self, *choices: type[yaml.Event]) -> bool:
        return bool(self._events.check_event(*choices))

    def peek_event(self) -> yaml.Event:
        event: yaml.Event = self._events.peek_event()
        return event

    def get_event(self) -> yaml.Event:
        event: yaml.Event = self._events.get_event()
        return event

    def dispose(self) -> None:
        self._events.dispose()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._anchored.get(id(node))
            if size is None:
                raise PlanError(f"the alias *{event.anchor} is inside its own anchor", path=self.origin)
            self._expanded += size
            if self._expanded > MAX_ALIAS_EXPANSION:
                raise PlanError(
                    f"YAML aliases expand the plan by more than {MAX_ALIAS_EXPANSION // (1024 * 1024)} MiB "
                    "(the limit; nested aliases, a 'billion laughs', are refused)",
                    path=self.origin,
                )
        else:
            collection = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
            if collection:
                if len(self._open) >= MAX_PLAN_DEPTH:
                    raise _too_deep(self.origin)
                self._open.append(2)
            node = super().compose_node(parent, index)
            assert node is not None
            size = self._open.pop() if collection else len(node.value) + 3
            if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
                self._anchored[id(node)] = size
        if self._open:
            self._open[-1] += size
        return node


_JSON_ESCAPE = re.compile(r"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes


def _json_depth(text: str) -> int:
    """How deep the lists and objects of a JSON text nest, from its brackets and quotes alone.

    ``json.loads`` recurses once per level, so the depth is known before it runs, at C
    speed: escapes out, everything but brackets and quotes out, then the quoted parts
    (strings holding brackets) out, and a running sum. 16 ms for a 2 MB plan, a sixth
    of ``json.loads``.
    """
    if "\\" in text:
        text = _JSON_ESCAPE.sub("", text)
    # Two adjacent quotes enclose nothing, or nothing lies between two strings: dropping
    # them changes no bracket's side. What is left quoted are strings holding brackets.
    skeleton = text.encode().translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = b"".join(skeleton.split(b'"')[::2])
    return max(itertools.accumulate(array("b", skeleton.translate(_STEPS))), default=0)


def _parse_text(text: str, origin: str) -> Any:
    if "\x00" in text:
        raise PlanError("is not a plan: it holds binary data", path=origin)
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise PlanError("the plan is empty", path=origin)
    if stripped[0] in "{[":
        if _json_depth(stripped) > MAX_PLAN_DEPTH:
            raise _too_deep(origin)
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            raise PlanError(
                f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path=origin
            ) from None
        except RecursionError:  # brackets in a malformed string fooled the count
            raise _too_deep(origin) from None
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(stripped, origin)  # reads the text: may raise a YAMLError too
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "maximum nesting depth" in problem:  # libyaml's own limit (1,000), met while looking ahead
            raise _too_deep(origin) from None
        raise PlanError(f"invalid YAML{where}: {problem}", path=origin) from None
    except UnicodeEncodeError:  # a lone surrogate in a str given to parse_plan
        raise PlanError("is not valid Unicode text", path=origin) from None
    except RecursionError:
        raise _too_deep(origin) from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_data(text: str, origin: str) -> Any:
    """YAML or JSON text as data, with a plan's bounds (depth, alias expansion); errors E001
    naming ``origin``. For files beside a plan, such as ``--params-file``."""
    with full_collections_held:
        return _parse_text(text, origin)


def parse_plan(source: str | Mapping[str, Any], *, origin: str = "plan") -> Plan:
    """Parse a plan from YAML or JSON text (told apart by content) or from a mapping.

    Args:
        source: The plan text, or an already parsed mapping.
        origin: What to call the source in errors, e.g. its file name.

    Raises:
        PlanError: The text is not a plan, or the plan breaks the schema.
    """
    with full_collections_held:
        data = _parse_text(source, origin) if isinstance(source, str) else source
        if not isinstance(data, Mapping):
            raise PlanError(
                f"a plan is a mapping with a 'tasks' list, not {type(data).__name__}", path=origin
            )
        try:
            return Plan.model_validate(data)
        except ValidationError as e:
            raise plan_error_from(e) from None
        except RecursionError:
            raise PlanError("the plan is nested too deeply", path=origin) from None


def load_plan(path: str | Path) -> Plan:
    """Load a plan file, YAML or JSON.

    Example:
        >>> load_plan("examples/quickstart.yaml").plan_id  # doctest: +SKIP
        'quickstart'

    Raises:
        PlanError: The file is missing, unreadable, too large, not text, or not a valid plan.
    """
    p = Path(path)
    origin = str(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        raise PlanError("no such plan file", path=origin) from None
    except IsADirectoryError:
        raise PlanError("is a directory, not a plan file", path=origin) from None
    except OSError as e:
        raise PlanError(f"cannot read the plan file: {e.strerror or e}", path=origin) from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(f"the plan file is larger than {MAX_PLAN_BYTES // (1024 * 1024)} MiB", path=origin)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(f"is not UTF-8 text (byte {e.start})", path=origin) from None
    plan = parse_plan(text, origin=origin)
    if plan.id is None and plan.name is None:
        stem = re.sub(r"[^A-Za-z0-9_.\-]+", "-", p.stem).strip("-") or "plan"
        plan = plan.model_copy(update={"id": stem[:200]})
    return plan
