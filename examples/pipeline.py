#!/usr/bin/env python3
"""The steps of ``examples/data-pipeline.yaml``: each reads its inputs as JSON on stdin.

``pipeline.py extract``    prints a day of orders (deterministic, with a few bad rows);
``pipeline.py clean``      drops rows without an amount and duplicate order ids;
``pipeline.py by-region``  sums the clean orders per region;
``pipeline.py by-hour``    counts the clean orders per hour;
``pipeline.py publish``    joins both aggregates into the report.

Every step prints one JSON document on stdout; taskexec stores it as the step's output
(``{"exit_code", "stdout", "stderr"}``) and hands it to the steps that declare it as an
input. Standard library only.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter, defaultdict
from typing import Any

REGIONS = ["north", "south", "east", "west"]


def _upstream(inputs: dict[str, Any], name: str) -> Any:
    return json.loads(inputs[name]["stdout"])


def extract(_: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(20260101)
    rows = []
    for i in range(500):
        rows.append(
            {
                "order_id": f"o{i:04d}",
                "region": rng.choice(REGIONS),
                "hour": rng.randrange(24),
                "amount": round(rng.uniform(5, 500), 2) if i % 97 else None,  # a few without amount
            }
        )
    rows += rows[10:13]  # and a few delivered twice
    return {"rows": rows}


def clean(inputs: dict[str, Any]) -> dict[str, Any]:
    seen: set[str] = set()
    kept = []
    for row in _upstream(inputs, "raw")["rows"]:
        if row["amount"] is None or row["order_id"] in seen:
            continue
        seen.add(row["order_id"])
        kept.append(row)
    raw = len(_upstream(inputs, "raw")["rows"])
    return {"rows": kept, "kept": len(kept), "dropped": raw - len(kept)}


def by_region(inputs: dict[str, Any]) -> dict[str, Any]:
    totals: dict[str, float] = defaultdict(float)
    for row in _upstream(inputs, "orders")["rows"]:
        totals[row["region"]] += row["amount"]
    return {"revenue": {k: round(v, 2) for k, v in sorted(totals.items())}}


def by_hour(inputs: dict[str, Any]) -> dict[str, Any]:
    counts = Counter(row["hour"] for row in _upstream(inputs, "orders")["rows"])
    busiest = max(counts, key=lambda h: counts[h])
    return {"orders": {str(h): counts[h] for h in sorted(counts)}, "busiest_hour": busiest}


def publish(inputs: dict[str, Any]) -> dict[str, Any]:
    revenue = _upstream(inputs, "regional")["revenue"]
    hourly = _upstream(inputs, "hourly")
    return {
        "total_revenue": round(sum(revenue.values()), 2),
        "top_region": max(revenue, key=lambda r: revenue[r]),
        "busiest_hour": hourly["busiest_hour"],
    }


STEPS = {"extract": extract, "clean": clean, "by-region": by_region, "by-hour": by_hour, "publish": publish}


def main(step: str) -> int:
    if step not in STEPS:
        print(f"unknown step {step!r}: one of {', '.join(STEPS)}", file=sys.stderr)
        return 2
    inputs = json.loads(sys.stdin.read() or "{}")
    print(json.dumps(STEPS[step](inputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
