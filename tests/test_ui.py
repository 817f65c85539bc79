"""The run dashboard in process (Starlette's TestClient): pages, API, actions, security.

Runs live in a SQLite store and move through the in-process stand-in of a fleet
(``tests/standin.py``): the actions call the same ``Client`` methods as the CLI, and those
reach the store as a worker's would. The browser scenario on a real fleet is
``tests/test_ui_browser.py``.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from taskexec import Client, RunStatus, TaskStatus
from taskexec.cli import main
from taskexec.errors import InvalidInputError
from taskexec.models import ErrorCode, ManifestTask, RunManifest
from taskexec.schedules import add_schedule
from taskexec.settings import Settings
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.store.tables import ExecutionLog, Run, utcnow
from taskexec.ui.app import create_app
from taskexec.ui.board import Board
from taskexec.ui.hub import EventHub
from taskexec.ui.security import Auth, check_bind
from tests.conftest import ROOT
from tests.standin import Harness, harness

XSS = "<script>alert(1)</script>"

PLAN = """
id: ui-demo
tasks:
  - id: prepare
    handler: stub
    output: data
  - id: score
    handler: stub
    depends_on: [prepare]
    inputs: [data]
    matrix:
      strategy: cartesian
      params: {model: [a, b, c]}
  - id: broken
    handler: stub
    depends_on: [prepare]
    retry: {max_attempts: 2, backoff: 0}
    params: {behavior: failure}
  - id: gate
    handler: approval
    depends_on: [prepare]
    params: {message: ship it?}
  - id: report
    handler: stub
    depends_on: [score, gate]
"""


@pytest.fixture
def h(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    with harness(tmp_path, monkeypatch, ["stub", "approval"]) as found:
        # The client's calls (cancel, retry, resume, approve) reach the stand-in fleet.
        monkeypatch.setattr(Client, "services", property(lambda self: found.svc))
        yield found


def web(h: Harness, *, read_only: bool = False, auth: Auth | None = None) -> TestClient:
    client = Client(h.svc.settings, app=h.app, store=h.svc.store)
    board = Board(h.svc.settings, h.svc.store, client)
    return TestClient(create_app(board, EventHub(None), auth=auth, read_only=read_only))


def drive(h: Harness) -> str:
    """The demo plan up to its gate: prepare and the matrix succeed, `broken` fails twice."""
    run_id = h.started(PLAN)
    h.execute(run_id, "prepare")
    h.advance(run_id, 1)
    for task in ("score[0]", "score[1]", "score[2]", "gate"):
        h.execute(run_id, task)
    h.execute(run_id, "broken")
    h.execute(run_id, "broken", detached=True)  # the retry (backoff 0)
    return run_id


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert found
    return found.group(1)


def test_the_run_page_shows_stages_graph_timeline_and_tasks(h: Harness) -> None:
    run_id = drive(h)
    assert h.statuses(run_id)["gate"] is TaskStatus.WAITING_APPROVAL
    assert h.statuses(run_id)["broken"] is TaskStatus.FAILED
    with web(h) as c:
        page = c.get(f"/runs/{run_id[:8]}")  # a prefix does
        assert page.status_code == 200, page.text
        html = page.text
        assert run_id in html and "ui-demo" in html
        # Per stage: stage 0 ended 1/1, stage 1 (score x3, broken, gate) 4/5 ended.
        stats = dict(
            (k, int(v)) for v, k in re.findall(r'<div class="stat[^"]*"><b>(\d+)</b> (\w+)</div>', html)
        )
        assert stats["retries"] == 1 and stats["failed"] == 1 and stats["waiting"] == 1  # counted live
        stages = dict(re.findall(r'data-stage="(\d+)" data-ended="(\d+)"', html))
        assert stages == {"0": "1", "1": "4", "2": "0"}
        # The graph: the matrix folded into one node, an edge per dependency.
        assert 'data-matrix="score"' in html and "score [3 cases]" in html
        assert (
            html.count('class="edge"') == 5
        )  # prepare->score, ->broken, ->gate; score->report, gate->report
        assert 'data-task="broken"' in html
        # Unfolded, the cases are nodes of their own.
        unfolded = c.get(f"/runs/{run_id}?expand=score").text
        assert all(f'data-task="score[{i}]"' in unfolded for i in range(3))
        assert unfolded.count('class="edge"') == 9
        # The timeline: one bar per attempt (prepare, 3 cases, gate, broken x2), a wait at the gate.
        assert len(re.findall(r'class="gbar attempt', html)) == 7
        assert len(re.findall(r'class="gbar approval_wait', html)) == 1
        assert len(re.findall(r'class="gbar retry_wait', html)) == 1
        # The task table filters by status and id.
        failed = c.get(f"/runs/{run_id}?tstatus=failed").text
        assert re.findall(r'<tr data-task="([^"]+)"', failed) == ["broken"]
        found = c.get(f"/runs/{run_id}?q=score").text
        assert re.findall(r'<tr data-task="([^"]+)"', found) == ["score[0]", "score[1]", "score[2]"]
        # The API agrees.
        api = c.get(f"/api/v1/runs/{run_id}/tasks", params={"status": "failed"}).json()
        assert [t["id"] for t in api["tasks"]] == ["broken"] and api["total"] == 1


def test_the_task_drawer_shows_every_attempt_and_error(h: Harness) -> None:
    run_id = drive(h)
    with web(h) as c:
        html = c.get(f"/runs/{run_id}/tasks/broken", headers={"X-Fragment": "drawer"}).text
        assert html.count('<tr class="attempt">') == 2
        assert "E005" in html  # failed after more than one attempt
        assert "standin:1" in html
        # Inputs and who produced them.
        score = c.get(f"/runs/{run_id}/tasks/score%5B1%5D", headers={"X-Fragment": "drawer"}).text
        assert 'data-task="prepare"' in score and "model" in score
        # Each attempt's logs (`taskexec logs`): the stub's failure, per attempt.
        assert html.count('<details class="logs"') == 2 and "behavior failure" in html.split('id="logs"')[1]
        logs = c.get(f"/api/v1/runs/{run_id}/tasks/broken/logs").json()
        assert [(e["attempt"], e["stream"]) for e in logs] == [(1, "error"), (2, "error")]
        assert c.get(f"/api/v1/runs/{run_id}/tasks/broken/logs", params={"attempt": 2}).json() == logs[1:]
        assert c.get(f"/api/v1/runs/{run_id}/tasks/nope/logs").status_code == 404
        attempts = c.get(f"/api/v1/runs/{run_id}/tasks/broken/attempts").json()
        assert [a["attempt"] for a in attempts] == [1, 2]
        assert all(a["worker"] == "standin:1" and a["status"] in ("retrying", "failed") for a in attempts)


def test_approve_from_the_page_with_csrf_records_who(h: Harness) -> None:
    run_id = drive(h)
    with web(h) as c:
        page = c.get("/approvals").text
        assert "ship it?" in page and 'data-gate="gate"' in page
        token = csrf_of(page)
        # Without the token: refused, the gate still waits.
        refused = c.post(f"/runs/{run_id}/tasks/gate/decide", data={"decision": "approve"})
        assert refused.status_code == 403 and "CSRF" in refused.text
        assert h.statuses(run_id)["gate"] is TaskStatus.WAITING_APPROVAL
        done = c.post(
            f"/runs/{run_id}/tasks/gate/decide",
            data={"decision": "approve", "reason": "looks good", "csrf": token, "next": "/approvals"},
            follow_redirects=False,
        )
        assert done.status_code == 303 and done.headers["location"].startswith("/approvals?done=")
    assert h.statuses(run_id)["gate"] is TaskStatus.SUCCEEDED
    with h.svc.store.begin() as s:
        decided = s.scalars(
            select(ExecutionLog.message).where(
                ExecutionLog.run_id == run_id, ExecutionLog.event == "approval"
            )
        ).all()
    assert len(decided) == 1 and decided[0].startswith("approved by ") and "(ui)" in decided[0]


def test_cancel_and_retry_are_the_clients_and_recorded(h: Harness) -> None:
    run_id = drive(h)
    with web(h) as c:
        token = csrf_of(c.get(f"/runs/{run_id}").text)
        headers = {"X-CSRF-Token": token}
        r = c.post(f"/api/v1/runs/{run_id}/actions/retry", json={"tasks": ["broken"]}, headers=headers)
        assert r.status_code == 200 and r.json() == {"reopened": ["broken"]}
        assert h.statuses(run_id)["broken"] is TaskStatus.PENDING
        r = c.post(f"/runs/{run_id}/cancel", data={"csrf": token}, follow_redirects=False)
        assert r.status_code == 303
    assert h.run(run_id).stop_reason == "cancelled"
    assert h.statuses(run_id)["gate"] is TaskStatus.CANCELLED
    with h.svc.store.begin() as s:
        actions = s.scalars(
            select(ExecutionLog.message).where(ExecutionLog.run_id == run_id, ExecutionLog.event == "action")
        ).all()
    assert [a.split(" requested by ")[0] for a in actions] == ["retry of 1 task(s)", "cancel"]
    assert all("(ui)" in a for a in actions)


def test_read_only_hides_and_refuses_actions(h: Harness) -> None:
    run_id = drive(h)
    with web(h, read_only=True) as c:
        page = c.get(f"/runs/{run_id}").text
        assert "Cancel run" not in page and "/cancel" not in page
        assert "Approve" not in c.get("/approvals").text
        token = csrf_of(page)
        r = c.post(f"/runs/{run_id}/cancel", data={"csrf": token})
        assert r.status_code == 403 and "read-only" in r.text
        r = c.post(f"/api/v1/runs/{run_id}/actions/cancel", headers={"X-CSRF-Token": token})
        assert r.status_code == 403
    assert h.run(run_id).stop_reason is None


def xss_manifest() -> RunManifest:
    task = ManifestTask(id=XSS, stage=0, handler="stub")
    return RunManifest(plan_id="xss", stages=[[XSS]], tasks=[task])


def test_untrusted_ids_outputs_and_messages_are_shown_as_text(h: Harness) -> None:
    run_id = uuid.uuid4().hex
    with h.svc.store.begin() as s:
        repo.add_run(s, run_id, xss_manifest(), labels={"team": XSS})
        repo.set_task_status(s, run_id, XSS, TaskStatus.QUEUED)
        repo.set_task_status(
            s,
            run_id,
            XSS,
            TaskStatus.FAILED,
            error_code=ErrorCode.EXECUTION_ERROR,
            message=XSS,
            output={"html": XSS, XSS: [XSS]},
        )
    with web(h) as c:
        pages = [
            c.get("/").text,
            c.get(f"/runs/{run_id}").text,
            c.get(f"/runs/{run_id}/tasks/{XSS}").text,
            c.get(f"/runs/{run_id}/tasks/{XSS}", headers={"X-Fragment": "drawer"}).text,
        ]
        assert c.get(f"/runs/{run_id}").headers["content-security-policy"].startswith("default-src 'self'")
    for html in pages:
        assert XSS not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert pages[2].count("&lt;script&gt;") >= 4  # the id, the message, the output's key and values


def add_runs(store: Store, n: int, *, tenant: str | None = None, plan: str = "bulk") -> list[str]:
    """``n`` one-task runs, submitted a second apart (the newest last)."""
    manifest = RunManifest(
        plan_id=plan, stages=[["t"]], tasks=[ManifestTask(id="t", stage=0, handler="stub")]
    )
    ids = []
    base = utcnow() - timedelta(days=1)
    with store.begin() as s:
        for i in range(n):
            run_id = f"{i:06d}" + uuid.uuid4().hex[6:]
            repo.add_run(s, run_id, manifest, tenant=tenant, labels={"n": str(i % 3)})
            s.execute(
                update(Run).where(Run.run_id == run_id).values(submitted_at=base + timedelta(seconds=i))
            )
            ids.append(run_id)
    return ids


def test_runs_list_pages_newest_first_with_filters_and_counts(store: Store) -> None:
    ids = add_runs(store, 130)
    board = Board(Settings(database_url=str(store.url)), store, None)
    seen: list[str] = []
    with TestClient(create_app(board, EventHub(None))) as c:
        url: str | None = "/"
        pages = 0
        while url:
            html = c.get(url).text
            seen += re.findall(r'<tr data-run="([^"]+)"', html)
            found = re.search(r'id="next-page" href="([^"]+)"', html)
            url = found.group(1).replace("&amp;", "&") if found else None
            pages += 1
        assert pages == 3
        assert seen == ids[::-1]  # newest first, each once
        html = c.get("/?label=n%3D1").text
        labelled = len([i for i in range(130) if i % 3 == 1])
        assert len(re.findall(r"<tr data-run=", html)) == labelled
        assert f"{labelled} runs" in html  # counted over the filter, not the page
        api = c.get("/api/v1/runs", params={"limit": 10}).json()
        assert [r["run_id"] for r in api["runs"]] == ids[::-1][:10] and api["counts"] == {"queued": 130}
        nxt = c.get("/api/v1/runs", params={"limit": 10, "cursor": api["next_cursor"]}).json()
        assert [r["run_id"] for r in nxt["runs"]] == ids[::-1][10:20]
        assert c.get("/api/v1/runs", params={"cursor": "garbage"}).status_code == 400
        bad = c.get("/api/v1/runs", params={"limit": "many"})
        assert bad.status_code == 400 and bad.json()["error"].startswith("E001 limit: ")
        assert c.get("/?status=nope").status_code == 400
        # No fleet behind this store: no action is offered.
        assert "Cancel run" not in c.get(f"/runs/{ids[0]}").text


def test_auth_basic_and_tenant_tokens(store: Store) -> None:
    mine = add_runs(store, 2, tenant="acme", plan="acme-plan")
    theirs = add_runs(store, 1, tenant="globex", plan="globex-plan")
    auth = Auth.from_settings(Settings(ui_auth="ana:s3cret", ui_tokens="tok-acme=acme,tok-all=*"))
    board = Board(Settings(database_url=str(store.url)), store, None)
    basic = "Basic " + base64.b64encode(b"ana:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"ana:nope").decode()
    with TestClient(create_app(board, EventHub(None), auth=auth)) as c:
        assert c.get("/").status_code == 401
        assert c.get("/healthz").json() == {"ok": True}  # the probe needs no credentials
        assert c.get("/static/ui.js").status_code == 200
        assert c.get("/", headers={"Authorization": wrong}).status_code == 401
        assert c.get("/api/v1/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/", headers={"Authorization": basic}).status_code == 200
        acme = {"Authorization": "Bearer tok-acme"}
        listed = c.get("/api/v1/runs", headers=acme).json()
        assert sorted(r["run_id"] for r in listed["runs"]) == sorted(mine)
        assert c.get("/api/v1/runs", params={"tenant": "globex"}, headers=acme).json()["runs"] != []
        assert all(r["tenant"] == "acme" for r in c.get("/api/v1/runs", headers=acme).json()["runs"])
        assert c.get(f"/runs/{theirs[0]}", headers=acme).status_code == 404
        assert c.get(f"/api/v1/runs/{theirs[0]}", headers=acme).status_code == 404
        assert c.get(f"/api/v1/runs/{mine[0]}", headers=acme).status_code == 200
        assert c.get("/fleet", headers=acme).status_code == 403
        every = {"Authorization": "Bearer tok-all"}
        assert c.get(f"/api/v1/runs/{theirs[0]}", headers=every).status_code == 200


def test_no_auth_off_loopback_refuses_to_start(tmp_path: Path) -> None:
    check_bind("127.0.0.1", Auth())
    check_bind("0.0.0.0", Auth(basic=("a", "b")))
    with pytest.raises(InvalidInputError, match="without auth"):
        check_bind("0.0.0.0", Auth())
    env = {"TASKEXEC_HOME": str(tmp_path)}
    result = CliRunner().invoke(main, ["ui", "--host", "0.0.0.0", "--port", "0"], env=env)
    assert result.exit_code == 2
    assert "E001" in result.output and "without auth" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(main, ["ui", "--host", "0.0.0.0"], env={**env, "TASKEXEC_UI_AUTH": "nopassword"})
    assert bad.exit_code == 2 and "TASKEXEC_UI_AUTH" in bad.output


def test_openapi_lists_the_api() -> None:
    store = Store("sqlite://")
    try:
        board = Board(Settings(), store, None)
        with TestClient(create_app(board, EventHub(None))) as c:
            doc = c.get("/api/v1/openapi.json").json()
    finally:
        store.close()
    paths = set(doc["paths"])
    assert {
        "/api/v1/runs",
        "/api/v1/runs/{run_ref}",
        "/api/v1/runs/{run_ref}/tasks",
        "/api/v1/runs/{run_ref}/tasks/{task_id}/attempts",
        "/api/v1/runs/{run_ref}/history",
        "/api/v1/runs/{run_ref}/actions/cancel",
        "/api/v1/runs/{run_ref}/tasks/{task_id}/actions/decide",
    } <= paths
    assert not any(p.startswith("/runs") for p in paths)  # pages stay out of the API document


def test_the_cli_starts_without_the_asgi_stack() -> None:
    stack = ("fastapi", "uvicorn", "starlette")
    code = f"import sys, taskexec.cli; print([m for m in {stack!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_assets_are_vendored_and_packaged() -> None:
    static = ROOT / "taskexec" / "ui" / "static"
    assert {p.name for p in static.iterdir()} >= {"ui.js", "ui.css"}
    for p in [*static.iterdir(), *(ROOT / "taskexec" / "ui" / "templates").iterdir()]:
        assert "http://" not in p.read_text() and "https://" not in p.read_text(), p
    assert '"ui/templates/*.html", "ui/static/*"' in (ROOT / "pyproject.toml").read_text()
    assert RunStatus.SUCCEEDED.value  # the statuses the templates colour


def test_a_large_run_is_drawn_as_stage_summaries(store: Store) -> None:
    tasks = [ManifestTask(id=f"s{k}-{i}", stage=k, handler="stub") for k in range(3) for i in range(120)]
    manifest = RunManifest(
        plan_id="big", stages=[[t.id for t in tasks if t.stage == k] for k in range(3)], tasks=tasks
    )
    run_id = uuid.uuid4().hex
    with store.begin() as s:
        repo.add_run(s, run_id, manifest)
    board = Board(Settings(database_url=str(store.url)), store, None)
    with TestClient(create_app(board, EventHub(None))) as c:
        html = c.get(f"/runs/{run_id}").text
        assert "collapsed to stages" in html
        nodes = re.findall(r"<text [^>]*>stage (\d): (\d+) tasks</text>", html)
        assert nodes == [("0", "120"), ("1", "120"), ("2", "120")]
        assert (
            html.count('class="edge"') == 2
            and "data-task=" not in html.split('id="graph"')[1].split("</svg>")[0]
        )
        # The task table pages through them all.
        assert re.search(r"1\u201350 of 360", html)
        last = c.get(f"/runs/{run_id}", params={"offset": 350}).text
        assert len(re.findall(r'<tr data-task="', last)) == 10


def test_the_fleet_page_without_a_fleet_lists_the_schedules(store: Store) -> None:
    manifest = RunManifest(
        plan_id="nightly", stages=[["t"]], tasks=[ManifestTask(id="t", stage=0, handler="stub")]
    )
    with store.begin() as s:
        add_schedule(s, [manifest], every_seconds=600, schedule_id="every-10m")
        add_schedule(s, [manifest], cron_expr="0 3 * * *", schedule_id="nightly-3am")
    board = Board(Settings(database_url=str(store.url)), store, None)
    with TestClient(create_app(board, EventHub(None))) as c:
        html = c.get("/fleet").text
    assert "no fleet configured" in html
    row = r'<tr data-schedule="([^"]+)"><td class="mono">[^<]+</td><td>nightly</td>'
    found = re.findall(row + r'<td class="mono">([^<]+)</td><td>([^<]+)</td>', html)
    rows = {sid: (trigger, next_at) for sid, trigger, next_at in found}
    assert rows["every-10m"][0] == "every 600s" and rows["nightly-3am"][0] == "cron 0 3 * * *"
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", n) for _, n in rows.values())  # next firings
    assert "Disable" not in html  # no fleet: read only


def test_the_fleet_page_says_what_it_could_not_read(h: Harness) -> None:
    with web(h) as c:
        page = c.get("/fleet")
    assert page.status_code == 200
    assert "workers not inspected" in page.text and "queue lengths not read" in page.text
