"""``taskexec run PLAN --ui``: the dashboard of the run, served while the run goes on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.integration


def test_run_with_ui_serves_the_dashboard_while_the_run_goes_on(tmp_path: Path) -> None:
    plan = tmp_path / "slow.yaml"
    plan.write_text(
        "tasks:\n"
        "  - {id: a, handler: stub, params: {delay: 4}}\n"
        "  - {id: b, handler: stub, depends_on: [a]}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKEXEC_")}
    env.update({"PYTHONPATH": str(ROOT), "TASKEXEC_HOME": str(tmp_path / "home")})
    err = tmp_path / "err.log"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskexec.cli", "run", str(plan), "--ui"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            wait_for(lambda: "dashboard at" in err.read_text(), timeout=60, what="the dashboard's URL")
            url = re.search(r"dashboard at (http://127\.0\.0\.1:\d+/)", err.read_text())
            assert url is not None
            assert proc.stdout is not None
            first = proc.stdout.readline()  # the run's id, first, as without --ui
            run_id = first.split()[0]
            assert re.fullmatch(r"[0-9a-f]{32}", run_id), first
            page = httpx.get(f"{url[1]}runs/{run_id}", timeout=10)
            assert page.status_code == 200 and run_id in page.text
            api = httpx.get(f"{url[1]}api/v1/runs/{run_id}", timeout=10).json()
            assert api["status"] in ("queued", "running")  # served while the run goes on
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err.read_text()
    assert "succeeded, 2/2 succeeded" in out
    with pytest.raises(httpx.TransportError):  # stopped with the run
        httpx.get(url[1], timeout=2)
