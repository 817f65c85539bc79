"""The dashboard's JSON API under ``/api/v1``: runs, a run, its tasks, attempts, history,
approvals, and the actions. The same :class:`~taskexec.ui.board.Board` calls as the pages;
FastAPI writes the OpenAPI document (``/api/v1/openapi.json``) from these signatures."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from taskexec.errors import InvalidInputError
from taskexec.models import RunStatus, TaskStatus
from taskexec.store import dashboard as q
from taskexec.ui.board import Board
from taskexec.ui.security import Access

__all__ = ["Decision", "RetryRequest", "api_router", "run_filter"]


class Decision(BaseModel):
    """An approval gate's decision."""

    approve: bool = True
    reason: str | None = Field(None, max_length=2000)


class RetryRequest(BaseModel):
    """Which tasks to run again (none named: every failed one)."""

    tasks: list[str] | None = None


def api_router(
    board: Board,
    call: Callable[..., Awaitable[Any]],
    post_guard: Callable[[Request], Awaitable[dict[str, str]]],
) -> APIRouter:
    """The API's routes; ``post_guard`` refuses an action (read-only, CSRF) before it runs."""
    api = APIRouter(prefix="/api/v1", tags=["runs"])

    @api.get("/runs")
    async def list_runs(
        request: Request,
        status: RunStatus | None = None,
        plan: str | None = None,
        tenant: str | None = None,
        label: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        """Runs, newest first (a keyset page: pass ``next_cursor`` as ``cursor``); counts by status."""
        where = run_filter({"plan": plan or "", "tenant": tenant or "", "label": label or ""})
        where = q.RunFilter(status, where.plan, where.tenant, where.label, since, until)
        page, counts = await call(board.runs, request.state.access, where, cursor=cursor, limit=limit)
        return {
            "runs": [r.model_dump(mode="json") for r in page.runs],
            "next_cursor": page.next_cursor,
            "counts": counts,
        }

    @api.get("/runs/{run_ref}")
    async def get_run(request: Request, run_ref: str) -> dict[str, Any]:
        """One run: summary, statistics, per-stage counts, params, timing."""
        view = await call(board.run, request.state.access, run_ref, flow=True)
        return {
            **view.summary.model_dump(mode="json"),
            "plan_name": view.plan_name,
            "params": view.params,
            "stages": {str(k): v for k, v in view.stages.items()},
            "started_at": view.started_at.isoformat() if view.started_at else None,
            "error_message": view.error_message,
            "stop_reason": view.stop_reason,
            "flow": view.flow.model_dump(mode="json") if view.flow else None,
        }

    @api.get("/runs/{run_ref}/tasks")
    async def list_tasks(
        request: Request,
        run_ref: str,
        status: TaskStatus | None = None,
        q_: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> dict[str, Any]:
        """A page of the run's tasks (by stage, then id), filtered by status and id substring."""
        access: Access = request.state.access
        run_id = await call(board.resolve, access, run_ref)
        page = await call(
            board.tasks,
            access,
            run_id,
            status=status.value if status else None,
            search=q_ or request.query_params.get("q"),
            offset=offset,
            limit=limit,
        )
        return {
            "total": page.total,
            "offset": page.offset,
            "limit": page.limit,
            "tasks": [_task_row(t) for t in page.tasks],
        }

    @api.get("/runs/{run_ref}/tasks/{task_id:path}/attempts")
    async def task_attempts(request: Request, run_ref: str, task_id: str) -> list[dict[str, Any]]:
        """Every attempt of a task: worker, times, outcome, metrics."""
        access: Access = request.state.access
        run_id = await call(board.resolve, access, run_ref)
        view = await call(board.task, access, run_id, task_id)
        return [_attempt(a) for a in view.attempts]

    @api.get("/runs/{run_ref}/tasks/{task_id:path}/logs")
    async def task_logs(
        request: Request, run_ref: str, task_id: str, attempt: int | None = None
    ) -> list[dict[str, Any]]:
        """What each attempt printed or logged (``taskexec logs``): stdout, stderr, http, error, log."""
        access: Access = request.state.access
        run_id = await call(board.resolve, access, run_ref)
        entries = await call(board.logs, access, run_id, task_id, attempt)
        return [e.model_dump(mode="json") for e in entries]

    @api.get("/runs/{run_ref}/tasks/{task_id:path}")
    async def get_task(request: Request, run_ref: str, task_id: str) -> dict[str, Any]:
        """One task: its result, definition, attempts and inputs' producers."""
        access: Access = request.state.access
        run_id = await call(board.resolve, access, run_ref)
        view = await call(board.task, access, run_id, task_id)
        return {
            **view.result.model_dump(mode="json"),
            "definition": view.definition.model_dump(mode="json", by_alias=True) if view.definition else None,
            "attempts": [_attempt(a) for a in view.attempts],
            "producers": view.producers,
            "flower_url": view.flower,
        }

    @api.get("/runs/{run_ref}/history")
    async def get_history(
        request: Request, run_ref: str, task: str | None = None, after: int = 0, limit: int = 200
    ) -> list[dict[str, Any]]:
        """The run's history from ``execution_logs``: transitions, decisions and actions (with who)."""
        access: Access = request.state.access
        run_id = await call(board.resolve, access, run_ref)
        lines = await call(board.history, access, run_id, task_id=task, after=after, limit=limit)
        return [
            {
                "at": h.at.isoformat(),
                "task_id": h.task_id,
                "attempt": h.attempt,
                "event": h.event,
                "to_status": h.to_status,
                "error_code": h.error_code,
                "message": h.message,
                "by": h.worker,
            }
            for h in lines
        ]

    @api.get("/approvals")
    async def list_approvals(request: Request) -> list[dict[str, Any]]:
        """Every task waiting at an approval gate, oldest first."""
        gates = await call(board.approvals, request.state.access)
        return [{**g.__dict__, "since": g.since.isoformat()} for g in gates]

    @api.post("/runs/{run_ref}/actions/cancel")
    async def act_cancel(request: Request, run_ref: str) -> dict[str, Any]:
        """Cancel the run (the CLI's ``taskexec cancel``)."""
        await post_guard(request)
        return {"status": await call(board.cancel, request.state.access, run_ref)}

    @api.post("/runs/{run_ref}/actions/retry")
    async def act_retry(request: Request, run_ref: str, body: RetryRequest | None = None) -> dict[str, Any]:
        """Run failed (or the named) tasks again (``taskexec retry``)."""
        await post_guard(request)
        tasks = body.tasks if body else None
        return {"reopened": await call(board.retry, request.state.access, run_ref, tasks)}

    @api.post("/runs/{run_ref}/actions/resume")
    async def act_resume(request: Request, run_ref: str) -> dict[str, Any]:
        """Send again what may have lost its messages (``taskexec resume``)."""
        await post_guard(request)
        return {"sent": await call(board.resume, request.state.access, run_ref)}

    @api.post("/runs/{run_ref}/tasks/{task_id:path}/actions/decide")
    async def act_decide(request: Request, run_ref: str, task_id: str, body: Decision) -> dict[str, Any]:
        """Approve or reject a gate (``taskexec approve [--reject]``)."""
        await post_guard(request)
        status = await call(
            board.approve, request.state.access, run_ref, task_id, reject=not body.approve, reason=body.reason
        )
        return {"status": status}

    return api


def _task_row(t: q.TaskRow) -> dict[str, Any]:
    return {
        "id": t.task_id,
        "stage": t.stage,
        "status": t.status,
        "attempts": t.attempts,
        "error_code": t.error_code,
        "error_message": t.error_message,
        "worker": t.worker,
        "started_at": t.started_at.isoformat() if t.started_at else None,
        "finished_at": t.finished_at.isoformat() if t.finished_at else None,
    }


def _attempt(a: q.Attempt) -> dict[str, Any]:
    return {
        "attempt": a.number,
        "worker": a.worker,
        "started_at": a.started_at.isoformat() if a.started_at else None,
        "ended_at": a.ended_at.isoformat() if a.ended_at else None,
        "status": a.status,
        "error_code": a.error_code,
        "message": a.message,
        "seconds": a.seconds,
        "metrics": a.metrics,
    }


def run_filter(params: dict[str, str]) -> q.RunFilter:
    """The runs list's filter from its query parameters.

    Raises:
        InvalidInputError: A status, label or time that does not parse (E001).
    """
    status = params.get("status") or None
    label = params.get("label") or None
    pair = None
    if label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"a label filter is KEY=VALUE, not {label!r}", path="label")
        pair = (key, value)
    try:
        run_status = RunStatus(status) if status else None
    except ValueError:
        raise InvalidInputError(f"no run status {status!r}", path="status") from None
    return q.RunFilter(
        run_status,
        params.get("plan") or None,
        params.get("tenant") or None,
        pair,
        _when(params.get("since"), "since"),
        _when(params.get("until"), "until"),
    )


def _when(text: str | None, path: str) -> datetime | None:
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(f"not an ISO date or time: {text!r}", path=path) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)
