#!/usr/bin/env python3
"""A stand-in for a model call and its grader, for ``examples/llm-regression.yaml``.

``llm_eval.py golden``  prints the reference answers the cases are graded against.
``llm_eval.py answer``  "asks the model" and grades the answer: prints one JSON line
                        ``{"case", "attempt", "score", "answer"}``.
``llm_eval.py summary`` reads every case's result (the fan-in artifact, on stdin) and
                        prints the mean score and the lowest one.

A shell step gets its resolved inputs as JSON on stdin and ``TASKEXEC_TASK_ID`` /
``TASKEXEC_ATTEMPT`` in its environment, but not its matrix parameters: the score is
therefore derived from the case id (``answer[3]``, one case per parameter combination)
and the attempt, deterministically, so that the same suite gives the same verdicts on
every run. Model outputs vary between calls; so do these scores between attempts, which
is what makes a criterion that failed worth re-running. ``LLM_EVAL_DRIFT`` (a variant
sets it) lowers every score, as a worse prompt or model release would.

Standard library only: the worker runs it with whatever ``python3`` is on its PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

GOLDEN = {"en": "Paris", "de": "Paris", "ja": "パリ"}


def score(case: str, attempt: int) -> float:
    """A score in [0.70, 1.00]: mostly passing, a few cases low on their first attempt."""
    digest = hashlib.sha256(f"{case}/{attempt}".encode()).digest()
    base = 0.70 + 0.30 * int.from_bytes(digest[:4], "big") / 2**32
    if attempt > 1:  # a second call is graded on a better day
        base = max(base, 0.85)
    return round(max(0.0, base - float(os.environ.get("LLM_EVAL_DRIFT", "0"))), 3)


def main(mode: str) -> int:
    inputs = json.loads(sys.stdin.read() or "{}")
    if mode == "golden":
        print(json.dumps(GOLDEN))
        return 0
    if mode == "answer":
        golden = json.loads(inputs["golden"]["stdout"])
        case = os.environ.get("TASKEXEC_TASK_ID", "answer[0]")
        attempt = int(os.environ.get("TASKEXEC_ATTEMPT", "1"))
        result = {"case": case, "attempt": attempt, "score": score(case, attempt), "answer": golden["en"]}
        print(json.dumps(result, ensure_ascii=False))
        return 0
    if mode == "summary":
        results = [json.loads(o["stdout"]) for o in inputs["answers"]]
        scores = [r["score"] for r in results]
        low = min(results, key=lambda r: r["score"])
        mean = sum(scores) / len(scores)
        print(f"{len(scores)} cases, mean score {mean:.3f}, lowest {low['case']} {low['score']}")
        return 0
    print(f"unknown mode {mode!r}: golden, answer or summary", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
