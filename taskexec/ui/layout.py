"""Where the run page's drawings put things: the task graph by stage and the timeline.

Plain geometry, no markup: the templates draw the SVG from these (escaped like any
other text). A matrix task's cases fold into one node unless expanded; a run with more
tasks than the board draws becomes one node per stage.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from taskexec.models import ManifestTask, TaskStatus
from taskexec.store.dashboard import Bar, TaskRow
from taskexec.store.tables import utcnow

__all__ = ["Gantt", "Graph", "gantt", "graph", "matrix_of", "stage_graph"]

NODE_W, NODE_H, COL_W, ROW_H, PAD = 170, 26, 220, 34, 12
_CASE = re.compile(r"^(?P<base>.+)\[(?P<n>\d+)\]$")
#: The order in which a folded node takes the colour of its cases' statuses: the most urgent first.
_URGENCY = [
    TaskStatus.FAILED,
    TaskStatus.ERROR,
    TaskStatus.TIMED_OUT,
    TaskStatus.VALIDATION_FAILED,
    TaskStatus.WAITING_APPROVAL,
    TaskStatus.RUNNING,
    TaskStatus.VALIDATING,
    TaskStatus.RETRYING,
    TaskStatus.QUEUED,
    TaskStatus.PENDING,
    TaskStatus.CANCELLED,
    TaskStatus.SKIPPED,
    TaskStatus.SUCCEEDED,
]


def matrix_of(task_id: str) -> str | None:
    """The matrix task a case id belongs to (``score[3]`` -> ``score``), else ``None``.

    >>> matrix_of("score[3]"), matrix_of("prepare")
    ('score', None)
    """
    m = _CASE.match(task_id)
    return m.group("base") if m else None


def _folded_status(statuses: list[str]) -> str:
    present = set(statuses)
    for s in _URGENCY:
        if s.value in present:
            return s.value
    return statuses[0] if statuses else TaskStatus.PENDING.value


@dataclass
class Node:
    """One box of the graph: a task, a folded matrix, or a stage summary."""

    key: str
    label: str
    status: str
    x: int
    y: int
    task_id: str | None = None  # opens the task drawer
    matrix: str | None = None  # folds or unfolds this matrix
    expanded: bool = False
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Edge:
    """A dependency: a curve from the right of ``src`` to the left of ``dst``."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def path(self) -> str:
        """The SVG path of the curve."""
        mid = (self.x1 + self.x2) // 2
        return f"M{self.x1},{self.y1} C{mid},{self.y1} {mid},{self.y2} {self.x2},{self.y2}"


@dataclass
class Graph:
    """The graph's nodes and edges, and the drawing's size."""

    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int
    summary: bool = False
    node_w: int = NODE_W
    node_h: int = NODE_H


def graph(rows: list[TaskRow], tasks: dict[str, ManifestTask], expanded: set[str]) -> Graph:
    """The tasks by stage (a column each), matrices folded unless named in ``expanded``."""
    by_stage: dict[int, list[Node]] = {}
    key_of: dict[str, str] = {}
    folded: dict[str, list[TaskRow]] = {}
    for r in rows:
        base = matrix_of(r.task_id)
        if base is not None and base not in expanded:
            folded.setdefault(f"{r.stage}:{base}", []).append(r)
            key_of[r.task_id] = f"m:{r.stage}:{base}"
        else:
            key_of[r.task_id] = f"t:{r.task_id}"
            by_stage.setdefault(r.stage, []).append(
                Node(
                    key_of[r.task_id],
                    r.task_id,
                    r.status,
                    0,
                    0,
                    task_id=r.task_id,
                    matrix=base,
                    expanded=base is not None,
                )
            )
    for key, cases in folded.items():
        stage_text, base = key.split(":", 1)
        counts = Counter(c.status for c in cases)
        by_stage.setdefault(int(stage_text), []).append(
            Node(
                f"m:{key}",
                f"{base} [{len(cases)} cases]",
                _folded_status([c.status for c in cases]),
                0,
                0,
                matrix=base,
                counts=dict(counts),
            )
        )
    pos: dict[str, Node] = {}
    height = 0
    stages = sorted(by_stage)
    for col, stage in enumerate(stages):
        nodes = sorted(by_stage[stage], key=lambda n: _sort_key(n.label))
        for row, n in enumerate(nodes):
            n.x, n.y = PAD + col * COL_W, PAD + 20 + row * ROW_H
            pos[n.key] = n
        height = max(height, PAD + 20 + len(nodes) * ROW_H)
    edges: list[Edge] = []
    seen: set[tuple[str, str]] = set()
    for r in rows:
        t = tasks.get(r.task_id)
        for dep in t.depends_on if t else []:
            pair = (key_of.get(dep, ""), key_of[r.task_id])
            if pair in seen or pair[0] not in pos or pair[0] == pair[1]:
                continue
            seen.add(pair)
            a, b = pos[pair[0]], pos[pair[1]]
            edges.append(Edge(a.x + NODE_W, a.y + NODE_H // 2, b.x, b.y + NODE_H // 2))
    width = PAD * 2 + max(1, len(stages)) * COL_W
    return Graph(list(pos.values()), edges, width, max(height + PAD, 80))


def stage_graph(stages: dict[int, dict[str, int]]) -> Graph:
    """A run too large to draw task by task: one node per stage, with its counts."""
    nodes = []
    for col, (stage, counts) in enumerate(sorted(stages.items())):
        total = sum(counts.values())
        status = _folded_status([s for s, n in counts.items() if n])
        nodes.append(
            Node(
                f"s:{stage}",
                f"stage {stage}: {total} tasks",
                status,
                PAD + col * COL_W,
                PAD + 20,
                counts=counts,
            )
        )
    edges = [
        Edge(a.x + NODE_W, a.y + NODE_H // 2, b.x, b.y + NODE_H // 2) for a, b in itertools.pairwise(nodes)
    ]
    return Graph(nodes, edges, PAD * 2 + max(1, len(nodes)) * COL_W, 90, summary=True)


def _sort_key(label: str) -> tuple[str, int]:
    m = _CASE.match(label)
    return (m.group("base"), int(m.group("n"))) if m else (label, -1)


@dataclass
class GanttBar:
    """One drawn bar: where, and what it stands for."""

    x: float
    y: int
    w: float
    bar: Bar


@dataclass
class Gantt:
    """The timeline: lanes (a worker or a stage each, a row per overlap) and bars."""

    lanes: list[tuple[str, int, int]]  # (label, y, rows)
    bars: list[GanttBar]
    ticks: list[tuple[float, str]]
    width: int
    height: int
    by: str
    truncated: bool = False


LANE_LABEL_W, PLOT_W, BAR_H = 190, 1000, 14


def gantt(
    bars: list[Bar], *, by: str = "worker", now: datetime | None = None, truncated: bool = False
) -> Gantt:
    """Bars laid out in lanes by worker (waits go to their task's stage) or by stage."""
    now = now or utcnow()
    if not bars:
        return Gantt([], [], [], LANE_LABEL_W + PLOT_W, 40, by, truncated)
    t0 = min(b.start for b in bars)
    t1 = max((b.end or now) for b in bars)
    span = max((t1 - t0).total_seconds(), 0.001)
    scale = PLOT_W / span

    def lane_of(b: Bar) -> str:
        if by == "stage":
            return f"stage {b.stage}"
        if b.kind != "attempt":  # a wait holds no worker
            return f"waiting (stage {b.stage})"
        return b.worker or "?"

    lanes: dict[str, list[float]] = {}  # label -> per row, the end (s) of its last bar
    placed: list[tuple[str, int, float, float, Bar]] = []
    for b in sorted(bars, key=lambda b: (lane_of(b), b.start)):
        label = lane_of(b)
        start = (b.start - t0).total_seconds()
        end = ((b.end or now) - t0).total_seconds()
        rows = lanes.setdefault(label, [])
        for i, last in enumerate(rows):
            if last <= start:
                rows[i] = end
                break
        else:
            rows.append(end)
            i = len(rows) - 1
        placed.append((label, i, start, end, b))
    lane_y: dict[str, int] = {}
    out_lanes = []
    y = 24
    for label in sorted(lanes, key=_lane_key):
        lane_y[label] = y
        out_lanes.append((label, y, len(lanes[label])))
        y += len(lanes[label]) * (BAR_H + 4) + 8
    out_bars = [
        GanttBar(
            LANE_LABEL_W + start * scale,
            lane_y[label] + row * (BAR_H + 4),
            max(2.0, (end - start) * scale),
            b,
        )
        for label, row, start, end, b in placed
    ]
    ticks = []
    for k in range(6):
        seconds = span * k / 5
        ticks.append((LANE_LABEL_W + seconds * scale, f"{seconds:.1f}s"))
    return Gantt(out_lanes, out_bars, ticks, LANE_LABEL_W + PLOT_W + 40, y + 10, by, truncated)


def _lane_key(label: str) -> tuple[int, int, str]:
    """Stages in their order, then the waits, then workers by name."""
    digits = "".join(c for c in label if c.isdigit())
    if label.startswith("stage "):
        return (0, int(digits or 0), label)
    if label.startswith("waiting "):
        return (1, int(digits or 0), label)
    return (2, 0, label)
