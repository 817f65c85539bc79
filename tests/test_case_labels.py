"""Readable matrix cases (issue 16, item 4) and a run summary that fits 80 columns (item 8).

A matrix case's values travel from the compiler (``ManifestTask.case``) through the store
(``TaskResult.case``) into every report: the table, JUnit, the HTML timeline and the JSON.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xmlschema
import yaml
from rich.console import Console

from taskexec import report
from taskexec.models import RunManifest, RunStatus, TaskResult, TaskStatus
from taskexec.plan import compile_plan, parse_plan
from taskexec.settings import Settings
from taskexec.store import repository as repo
from taskexec.store.engine import Store
from taskexec.store.results import run_result, task_result
from tests.test_embedded import assert_nothing_left, taskexec
from tests.test_report import EVERY_STATUS, SCHEMA, run_of, task

SETTINGS = Settings(allowed_handlers="stub")

MATRIX_PLAN: dict[str, Any] = {
    "id": "qa",
    "tasks": [
        {"id": "prep", "handler": "stub"},
        {
            "id": "answer",
            "handler": "stub",
            "depends_on": ["prep"],
            "params": {"delay": 0},
            "matrix": {
                "strategy": "cartesian",
                "params": {"model": ["gpt-4o", "claude"], "lang": ["en", "de"]},
            },
        },
    ],
}


def compile_one(doc: dict[str, Any]) -> RunManifest:
    [m] = compile_plan(parse_plan(doc), SETTINGS)
    return m


@pytest.fixture(scope="module")
def schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(SCHEMA))


def matrix_run() -> Any:
    tasks = [
        task("prep", TaskStatus.SUCCEEDED),
        task("answer[0]", TaskStatus.SUCCEEDED, case={"model": "gpt-4o", "lang": "en"}),
        task(
            "answer[1]",
            TaskStatus.FAILED,
            case={"model": "claude", "lang": "de", "prompt": "a <long> & winding prompt " * 4, "n": [1, 2]},
            error_message="boom",
        ),
    ]
    return run_of("default", tasks)


# ------------------------------------------------------------------ the compiler


def test_matrix_cases_carry_their_values_and_other_tasks_none() -> None:
    m = compile_one(MATRIX_PLAN)
    cases = {t.id: t.case for t in m.tasks}
    assert cases == {
        "prep": None,
        "answer[0]": {"model": "gpt-4o", "lang": "en"},
        "answer[1]": {"model": "gpt-4o", "lang": "de"},
        "answer[2]": {"model": "claude", "lang": "en"},
        "answer[3]": {"model": "claude", "lang": "de"},
    }
    for t in m.tasks[1:]:
        assert t.case is not None and t.params == {"delay": 0, **t.case}
    data = json.loads(m.model_dump_json())
    assert "case" not in data["tasks"][0] and data["tasks"][1]["case"] == {"model": "gpt-4o", "lang": "en"}
    assert RunManifest.model_validate_json(m.model_dump_json()) == m


def test_a_variant_overrides_params_but_not_the_case() -> None:
    doc = {**MATRIX_PLAN, "variants": {"fixed": {"model": "mini"}}}
    m = compile_one(doc)
    t = m.task("answer[0]")
    assert t.params["model"] == "mini" and t.case == {"model": "gpt-4o", "lang": "en"}


def test_a_plan_without_matrices_has_no_case_in_its_json() -> None:
    m = compile_one(
        {"tasks": [{"id": "a", "handler": "stub"}, {"id": "b", "handler": "stub", "depends_on": ["a"]}]}
    )
    assert '"case"' not in m.model_dump_json() and all(t.case is None for t in m.tasks)
    assert "case" not in m.model_dump(mode="json")["tasks"][0]  # what the store keeps


def test_the_size_estimate_counts_the_cases() -> None:
    from taskexec.plan import compiler

    seen: list[int] = []
    original = compiler._manifest_bytes

    def spy(*args: Any) -> tuple[int, int]:
        found = original(*args)
        seen.append(found[0])
        return found

    # Nearly all matrix cases with wide values: the case's bytes weigh.
    doc = {
        "tasks": [
            {"id": "m", "handler": "stub", "matrix": {"strategy": "cartesian", "params": {
                "model": [f"model-{'x' * 30}-{i}" for i in range(40)],
                "lang": [f"lang-{i}" for i in range(40)]}}},
        ]
    }  # fmt: skip
    compiler._manifest_bytes = spy  # type: ignore[assignment]
    try:
        manifests = compile_plan(parse_plan(doc), SETTINGS)
    finally:
        compiler._manifest_bytes = original
    exact = sum(len(m.__pydantic_serializer__.to_json(m)) for m in manifests)
    assert 0.95 < seen[0] / exact < 1.05


# ------------------------------------------------------------------ the store


def test_the_store_gives_each_result_its_case(store: Store) -> None:
    m = compile_one(MATRIX_PLAN)
    with store.begin() as s:
        repo.add_run(s, "r1", m)
    with store.begin() as s:
        result = run_result(s, "r1")
        one = task_result(s, "r1", "answer[2]")
        plain = task_result(s, "r1", "prep")
    assert {t.id: t.case for t in result.tasks} == {t.id: t.case for t in m.tasks}
    assert one.case == {"model": "claude", "lang": "en"} and plain.case is None
    data = json.loads(report.to_json(result))
    assert data["tasks"][1]["case"] == {"model": "gpt-4o", "lang": "en"} and data["tasks"][0]["case"] is None


# ------------------------------------------------------------------ labels


def test_case_labels_are_compact_and_short() -> None:
    assert report.case_label(None) == "" and report.case_label({}) == ""
    assert report.case_label({"model": "gpt-4o", "lang": "en"}) == "model=gpt-4o lang=en"
    assert report.case_label({"t": 0.5, "on": True, "x": None, "xs": [1, 2], "o": {"a": 1}}) == (
        't=0.5 on=true x=null xs=[1,2] o={"a":1}'
    )
    assert report.case_label({"s": "two words", "e": "", "q": "a=b"}) == 's="two words" e="" q="a=b"'
    assert report.case_label({"n": "7"}) == "n=7"
    long = report.case_label({"prompt": "p" * 100})
    assert long == "prompt=" + "p" * (report.CASE_VALUE_CHARS - 1) + "…"
    many = report.case_label({f"k{i}": f"value{i}" for i in range(30)})
    assert (
        len(many) == report.CASE_LABEL_CHARS and many.endswith("…") and many.startswith("k0=value0 k1=value1")
    )


def test_task_label() -> None:
    t = TaskResult(id="answer[0]", status=TaskStatus.SUCCEEDED, case={"model": "gpt-4o", "lang": "en"})
    assert report.task_label(t) == "answer[0] model=gpt-4o lang=en"
    assert report.task_label(TaskResult(id="prep", status=TaskStatus.SUCCEEDED)) == "prep"


# ------------------------------------------------------------------ reports


def test_junit_names_cases_by_their_values_and_lists_them_as_properties(schema: xmlschema.XMLSchema) -> None:
    xml = report.to_junit([matrix_run()])
    schema.validate(xml)
    suite = ET.fromstring(xml).find("testsuite")
    assert suite is not None
    names = [c.get("name") for c in suite.iter("testcase")]
    assert names[:2] == ["prep", "answer[0] model=gpt-4o lang=en"]
    assert (names[2] or "").startswith('answer[1] model=claude lang=de prompt="a <long>')
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["answer[0].model"] == "gpt-4o" and props["answer[0].lang"] == "en"
    assert props["answer[1].prompt"] == "a <long> & winding prompt " * 4  # the whole value
    assert props["answer[1].n"] == "[1,2]"
    assert not any((n or "").startswith("prep.") for n in props)
    assert props["run_id"] == "run-default"  # the run's own properties stay


def test_html_shows_the_case_next_to_the_task_id() -> None:
    page = report.to_html([matrix_run()])
    assert "<td>answer[0]<span class='case' title='" in page
    assert ">model=gpt-4o lang=en</span></td>" in page
    assert "a &lt;long&gt; &amp; winding" in page and "<long>" not in page


def test_the_table_shows_the_case_after_the_task_id() -> None:
    buf = io.StringIO()
    report.render_table(matrix_run(), Console(file=buf, width=200))
    text = buf.getvalue()
    assert "answer[0] model=gpt-4o lang=en" in text
    assert "answer[1] model=claude lang=de" in text and "n=[1,2]" in text


# ------------------------------------------------------------------ the summary in 80 columns


def _long_run(plan_id: str = "evaluation-suite", variant: str = "nightly") -> Any:
    r = run_of(variant, EVERY_STATUS)
    return r.model_copy(update={"run_id": "3f2a" * 8, "plan_id": plan_id})


@pytest.mark.parametrize(
    ("plan_id", "variant"),
    [("p", "default"), ("evaluation-suite", "nightly"), ("x" * 70, "v" * 40), ("quick", "default")],
)
def test_summary_lines_fit_80_columns_and_keep_every_word(plan_id: str, variant: str) -> None:
    r = _long_run(plan_id, variant)
    one = report.summary_line(r)
    assert len(one) > 80  # the case the lines are for
    lines = report.summary_lines(r)
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith(f"{plan_id}/{variant} {r.run_id}: failed") or (
        "…" in lines[0] and f" {r.run_id}: failed" in lines[0]
    )
    assert all(line.startswith("  ") and not line.startswith("   ") for line in lines[1:])
    joined = " ".join(line.strip() for line in lines)
    tail = one.split(f"{r.run_id}: ", 1)[1]
    assert joined.endswith(f"{r.run_id}: {tail}")  # the same words, in the same order
    if "…" not in lines[0]:
        assert joined == one


def test_a_summary_that_fits_stays_one_line() -> None:
    r = run_of("v", [task("ok", TaskStatus.SUCCEEDED)], status=RunStatus.SUCCEEDED)
    assert report.summary_lines(r) == [report.summary_line(r)]
    assert report.summary_lines(r, width=30) != [report.summary_line(r)]


def test_the_table_prints_the_summary_within_80_columns_on_a_wide_terminal() -> None:
    buf = io.StringIO()
    r = _long_run()
    report.render_table(r, Console(file=buf, width=200))
    lines = buf.getvalue().splitlines()
    assert lines[: len(report.summary_lines(r))] == report.summary_lines(r)
    assert lines[0].startswith(f"evaluation-suite/nightly {r.run_id}: failed,")
    assert all(len(line) <= 80 for line in lines[:2])
    narrow = io.StringIO()
    report.render_table(r, Console(file=narrow, width=60))
    assert all(len(line) <= 60 for line in narrow.getvalue().splitlines()[: len(report.summary_lines(r, 60))])


# ------------------------------------------------------------------ end to end


@pytest.fixture
def home() -> Iterator[Path]:
    """A short TASKEXEC_HOME (a Unix socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tx-", dir="/tmp"))
    try:
        yield path / "home"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.integration
def test_an_embedded_matrix_run_reports_its_cases(home: Path) -> None:
    plan = home.parent / "qa.yaml"
    plan.write_text(yaml.safe_dump(MATRIX_PLAN, sort_keys=False))
    junit = home.parent / "junit.xml"
    p = taskexec(home, "run", str(plan), "--json", "--junit", str(junit))
    assert p.returncode == 0, p.stderr
    [r] = json.loads(p.stdout)
    assert_nothing_left(home)

    got = taskexec(home, "results", r["run_id"], "--format", "json")
    assert got.returncode == 0, got.stderr
    cases = {t["id"]: t["case"] for t in json.loads(got.stdout)["tasks"]}
    assert cases == {
        "prep": None,
        "answer[0]": {"model": "gpt-4o", "lang": "en"},
        "answer[1]": {"model": "gpt-4o", "lang": "de"},
        "answer[2]": {"model": "claude", "lang": "en"},
        "answer[3]": {"model": "claude", "lang": "de"},
    }
    for xml in (
        junit.read_text(encoding="utf-8"),
        taskexec(home, "results", r["run_id"], "--format", "junit").stdout,
    ):
        xmlschema.XMLSchema(str(SCHEMA)).validate(xml)
        suite = ET.fromstring(xml).find("testsuite")
        assert suite is not None
        names = {c.get("name") for c in suite.iter("testcase")}
        assert names == {
            "prep",
            "answer[0] model=gpt-4o lang=en",
            "answer[1] model=gpt-4o lang=de",
            "answer[2] model=claude lang=en",
            "answer[3] model=claude lang=de",
        }
        props = {p.get("name"): p.get("value") for p in suite.iter("property")}
        assert (props["answer[3].model"], props["answer[3].lang"]) == ("claude", "de")
    table = taskexec(home, "results", r["run_id"], "--format", "table")
    # 80 columns when piped: the label folds within the task's cell (whole on a wide terminal).
    assert "answer[2]" in table.stdout and "model=clau" in table.stdout and "lang=en" in table.stdout, (
        table.stdout
    )
    assert_nothing_left(home)
