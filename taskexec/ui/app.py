"""The dashboard's ASGI app: HTML pages, the JSON API under ``/api/v1``, live events (SSE).

Pages are rendered on the server (Jinja2, autoescaped: task ids, outputs and messages are
untrusted text); a small vendored script (``static/ui.js``) follows the page's Server-Sent
Events and swaps in fresh fragments, opens the task drawer, and asks before an action.
Pages and API call the same :class:`~taskexec.ui.board.Board` functions; the OpenAPI
document is at ``/api/v1/openapi.json``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool

from taskexec.errors import RunNotFoundError, ServiceUnavailableError, TaskexecError
from taskexec.models import RunStatus, TaskStatus
from taskexec.ui import layout
from taskexec.ui.api import api_router, run_filter
from taskexec.ui.board import Board
from taskexec.ui.fleet import fleet_view
from taskexec.ui.hub import ALL, EventHub
from taskexec.ui.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    Access,
    Auth,
    Refused,
    csrf_ok,
    new_csrf,
)

__all__ = ["create_app"]

_HERE = Path(__file__).parent
#: Seconds between keep-alive comments on an open event stream (proxies close silent ones).
KEEPALIVE = 15.0
#: Most bars the run page's timeline draws (the first ones, by start): beyond that an SVG
#: costs the browser more than it shows.
TIMELINE_BARS = 1000
#: Least time between two "refresh" events sent to one page (a burst of changes is one refresh).
COALESCE = 0.25


def _local_user() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} (ui)"


def create_app(board: Board, hub: EventHub, *, auth: Auth | None = None, read_only: bool = False) -> FastAPI:
    """The dashboard over ``board``'s store and fleet, live through ``hub``.

    Args:
        board: Reads and actions.
        hub: Run events (one Redis subscription for every open page).
        auth: Credentials every request must carry (none: an open, loopback-only dashboard).
        read_only: Hide every action and refuse it (403).
    """
    auth = auth or Auth()
    local = Access(_local_user())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        hub.close()

    app = FastAPI(
        title="taskexec dashboard",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI would load its assets from a CDN
        redoc_url=None,
        lifespan=lifespan,
    )
    # Autoescape every template (their SVG included): task ids, outputs and messages are untrusted.
    env = Environment(loader=FileSystemLoader(str(_HERE / "templates")), autoescape=True)
    templates = Jinja2Templates(env=env)
    env.filters["q"] = lambda s: quote(str(s), safe="")
    env.filters["ago"] = _ago
    env.filters["ts"] = _ts
    env.filters["clock"] = _clock
    env.filters["secs"] = _secs
    env.filters["qs"] = _qs
    env.globals.update(
        read_only=read_only, statuses=[s.value for s in TaskStatus], run_statuses=list(RunStatus)
    )
    app.mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path.startswith("/static/") or request.url.path == "/healthz":
            return await call_next(request)  # assets and the liveness probe need no credentials
        if auth.enabled:
            access = auth.check(request.headers.get("authorization"))
            if access is None:
                return Response(
                    "E001 authentication required: wrong or missing credentials\n",
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="taskexec"'},
                    media_type="text/plain",
                )
        else:
            access = local
        request.state.access = access
        cookie = request.cookies.get(CSRF_COOKIE)
        request.state.csrf = cookie or new_csrf()
        response = await call_next(request)
        if cookie is None:
            response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'",
        )
        return response

    def render(request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        ctx.update(
            access=request.state.access, csrf=request.state.csrf, can_act=board.can_act and not read_only
        )
        response: HTMLResponse = templates.TemplateResponse(request, name, ctx, status_code=status_code)
        return response

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        """A query or body that does not parse: one line naming E001 and the field, as the CLI says it."""
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
        message = f"E001 {where or 'request'}: {first.get('msg', 'invalid')}"
        if wants_json(request):
            return JSONResponse({"error": message, "code": "E001"}, status_code=400)
        return render(request, "error.html", status_code=400, message=message)

    @app.exception_handler(TaskexecError)
    async def taskexec_error(request: Request, exc: TaskexecError) -> Response:
        code = 404 if isinstance(exc, RunNotFoundError) else 400
        if isinstance(exc, ServiceUnavailableError):
            code = 503
        elif type(exc).__name__ == "ConflictError":
            code = 409
        if wants_json(request):
            return JSONResponse({"error": str(exc), "code": exc.code.value}, status_code=code)
        return render(request, "error.html", status_code=code, message=str(exc))

    async def post_guard(request: Request) -> dict[str, str]:
        """Refuse an action when read-only or without the CSRF token; the form's fields."""
        if read_only:
            raise Refused(403, "E001 the dashboard is read-only: actions are refused")
        form: dict[str, str] = {}
        if request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            form = {k: str(v) for k, v in (await request.form()).items()}
        access: Access = request.state.access
        sent = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
        if not access.bearer and not csrf_ok(request.cookies.get(CSRF_COOKIE), sent):
            raise Refused(403, "E001 missing or wrong CSRF token: reload the page and try again")
        return form

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        if wants_json(request):
            return JSONResponse({"error": exc.message, "code": "E001"}, status_code=exc.status)
        return render(request, "error.html", status_code=exc.status, message=exc.message)

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return run_in_threadpool(fn, *args, **kwargs)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        """Liveness for container probes: the process serves (it reads nothing)."""
        return {"ok": True}

    # ---------------- pages ----------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def runs_page(request: Request) -> HTMLResponse:
        where = run_filter(dict(request.query_params))
        cursor = request.query_params.get("cursor") or None
        page, counts = await call(board.runs, request.state.access, where, cursor=cursor, limit=50)
        params = {k: v for k, v in request.query_params.items() if k != "cursor" and v}
        return render(
            request,
            "runs.html",
            page=page,
            counts=counts,
            params=params,
            next_url=f"?{urlencode({**params, 'cursor': page.next_cursor})}" if page.next_cursor else None,
            live=hub.live,
        )

    async def run_context(request: Request, run_ref: str) -> dict[str, Any]:
        access: Access = request.state.access
        qp = request.query_params
        view = await call(board.run, access, run_ref, flow=True)
        run_id = view.summary.run_id
        expanded = {x for x in qp.getlist("expand") if x}
        rows = await call(board.graph_rows, access, run_id)
        if rows is None:
            graph = layout.stage_graph(view.stages)
        else:
            manifest = await call(board.manifest, access, run_id)
            graph = layout.graph(rows, {t.id: t for t in manifest.tasks}, expanded)
        by = "stage" if qp.get("by") == "stage" else "worker"
        bars, cut = await call(board.timeline, access, run_id, limit=TIMELINE_BARS)
        tstatus, search = qp.get("tstatus") or None, qp.get("q") or None
        offset = _int(qp.get("offset"), 0)
        tasks = await call(
            board.tasks, access, run_id, status=tstatus, search=search, offset=offset, limit=50
        )
        return {
            "view": view,
            "run": view.summary,
            "graph": graph,
            "gantt": layout.gantt(bars, by=by, truncated=cut),
            "tasks": tasks,
            "tstatus": tstatus or "",
            "search": search or "",
            "expanded": sorted(expanded),
            "by": by,
            "done": qp.get("done"),
            "live": hub.live,
        }

    @app.get("/runs/{run_ref}", response_class=HTMLResponse, include_in_schema=False)
    async def run_page(request: Request, run_ref: str) -> HTMLResponse:
        return render(request, "run.html", **(await run_context(request, run_ref)))

    @app.get("/runs/{run_ref}/tasks/{task_id:path}", response_class=HTMLResponse, include_in_schema=False)
    async def task_drawer(request: Request, run_ref: str, task_id: str) -> HTMLResponse:
        access: Access = request.state.access
        run_id = await call(board.resolve, access, run_ref)
        view = await call(board.task, access, run_id, task_id)
        fragment = request.headers.get("x-fragment") == "drawer"
        return render(request, "drawer.html" if fragment else "drawer_page.html", task=view, run_id=run_id)

    @app.get("/approvals", response_class=HTMLResponse, include_in_schema=False)
    async def approvals_page(request: Request) -> HTMLResponse:
        gates = await call(board.approvals, request.state.access)
        return render(request, "approvals.html", gates=gates, done=request.query_params.get("done"))

    @app.get("/fleet", response_class=HTMLResponse, include_in_schema=False)
    async def fleet_page(request: Request) -> HTMLResponse:
        access: Access = request.state.access
        if access.tenant is not None:
            raise Refused(403, "E001 the fleet page is for operators: a tenant token sees only its runs")
        view = await call(fleet_view, board)
        return render(request, "fleet.html", fleet=view, done=request.query_params.get("done"))

    # ---------------- live events ----------------

    async def stream(request: Request, key: str) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            queue = hub.subscribe(key)
            try:
                while not await request.is_disconnected():
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=KEEPALIVE)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    await asyncio.sleep(COALESCE)  # let a burst of changes land in one refresh
                    while not queue.empty():
                        event = queue.get_nowait()
                    data = {k: event.get(k) for k in ("run_id", "task_id", "status")}
                    if key == ALL and request.state.access.tenant is not None:
                        data = {}  # a tenant's page refreshes, and learns nothing of other tenants' runs
                    yield f"event: change\ndata: {json.dumps(data)}\n\n"
            finally:
                hub.unsubscribe(key, queue)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.get("/runs/{run_ref}/events", include_in_schema=False)
    async def run_events(request: Request, run_ref: str) -> StreamingResponse:
        run_id = await call(board.resolve, request.state.access, run_ref)
        return await stream(request, run_id)

    @app.get("/events", include_in_schema=False)
    async def all_events(request: Request) -> StreamingResponse:
        return await stream(request, ALL)

    # ---------------- actions (forms) ----------------

    def back(url: str, message: str) -> RedirectResponse:
        return RedirectResponse(f"{url}?{urlencode({'done': message})}", status_code=303)

    @app.post("/runs/{run_ref}/cancel", include_in_schema=False)
    async def cancel_form(request: Request, run_ref: str) -> Response:
        await post_guard(request)
        status = await call(board.cancel, request.state.access, run_ref)
        return back(f"/runs/{quote(run_ref)}", f"cancel requested: the run is {status}")

    @app.post("/runs/{run_ref}/retry", include_in_schema=False)
    async def retry_form(request: Request, run_ref: str) -> Response:
        await post_guard(request)
        reopened = await call(board.retry, request.state.access, run_ref)
        return back(f"/runs/{quote(run_ref)}", f"{len(reopened)} task(s) run again")

    @app.post("/runs/{run_ref}/resume", include_in_schema=False)
    async def resume_form(request: Request, run_ref: str) -> Response:
        await post_guard(request)
        sent = await call(board.resume, request.state.access, run_ref)
        return back(f"/runs/{quote(run_ref)}", f"resumed: {sent} task(s) sent again")

    @app.post("/runs/{run_ref}/tasks/{task_id:path}/decide", include_in_schema=False)
    async def decide_form(request: Request, run_ref: str, task_id: str) -> Response:
        form = await post_guard(request)
        reject = form.get("decision") == "reject"
        reason = form.get("reason") or None
        status = await call(
            board.approve, request.state.access, run_ref, task_id, reject=reject, reason=reason
        )
        to = "/approvals" if form.get("next") == "/approvals" else f"/runs/{quote(run_ref)}"
        return back(to, f"{task_id}: {'rejected' if reject else 'approved'} ({status})")

    @app.post("/schedules/{schedule_id}/{state}", include_in_schema=False)
    async def schedule_form(
        request: Request, schedule_id: str, state: Literal["enable", "disable"]
    ) -> Response:
        await post_guard(request)
        access: Access = request.state.access
        if access.tenant is not None:
            raise Refused(403, "E001 schedules are for operators")
        from taskexec.ui.fleet import set_schedule

        await call(set_schedule, board, schedule_id, state == "enable")
        return back("/fleet", f"schedule {schedule_id} {state}d")

    app.include_router(api_router(board, call, post_guard))
    return app


# ---------------- helpers ----------------


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _qs(params: dict[str, Any], **changes: Any) -> str:
    """A query string: ``params`` with ``changes`` applied, empty values left out.

    >>> _qs({"status": "failed", "plan": ""}, cursor="abc")
    'status=failed&cursor=abc'
    """
    merged = {**params, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


def _ts(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at else "—"


def _clock(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] if at else "—"


def _ago(at: datetime | None) -> str:
    if at is None:
        return "—"
    seconds = max(0, int((datetime.now(UTC) - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _secs(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} s" if value < 120 else f"{value / 60:.1f} min"
