"""Commands on runs: run, submit, status, results, watch, cancel, resume, runs."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TYPE_CHECKING

import click
from rich.console import Console

from taskexec import report
from taskexec.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    RunRef,
    exit_for,
    fleet_or_embedded,
    make_client,
    manifests,
    needs_fleet,
    params_options,
    run_argument,
    user_errors,
    with_params,
)
from taskexec.cli.common import labels as labels_of
from taskexec.errors import InvalidInputError
from taskexec.models import RunManifest, RunResult, RunStatus, TaskStatus
from taskexec.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from taskexec.client import Client
    from taskexec.embedded import EmbeddedFleet

__all__ = ["cancel", "results", "resume", "run", "runs_", "status", "submit", "watch"]


#: ``--execution`` of ``run`` and ``submit``.
execution_option = click.option(
    "--execution",
    type=click.Choice(["stages", "dag"]),
    default=None,
    help="Override the plan's execution: stages (a barrier after each stage) or dag (each task as "
    "soon as its own upstream tasks have ended).",
)


@click.command()
@click.argument("plan", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of run results.")
@click.option("--variant", default=None, help="Run only this variant.")
@click.option("--tenant", default=None, help="Tenant to record with the runs.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label the runs (repeatable).")
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Stop after this many seconds: embedded, the runs are stopped and end timed_out (exit 1); "
    "on a fleet, stop waiting (the runs go on).",
)
@click.option(
    "--junit",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the runs' results as JUnit XML to this file (for CI).",
)
@execution_option
@click.option(
    "--ui", "with_ui", is_flag=True, help="Also serve the run dashboard while waiting (its URL on stderr)."
)
@params_options
@user_errors
def run(
    plan: str,
    as_json: bool,
    variant: str | None,
    tenant: str | None,
    labels: tuple[str, ...],
    timeout: float | None,
    junit: str | None,
    execution: str | None = None,
    param_pairs: tuple[str, ...] = (),
    params_file: str | None = None,
    with_ui: bool = False,
) -> None:
    """Submit every variant of PLAN and wait for the runs (embedded mode without a broker).

    Without --json, each run's id is printed as it is submitted (the first line), then the
    live view on a terminal, and the results.

    Exit status 0 when every run succeeded, 1 when one ended otherwise (failed, cancelled,
    timed_out) or had not ended by --timeout. Ctrl-C or SIGTERM stops waiting: in embedded
    mode the runs are cancelled (their tasks left end cancelled, E004) and the local worker
    and Redis stopped; on a fleet the runs go on. Exit status 128 + signal.
    """
    import time

    settings = Settings()
    found = with_params(manifests(plan, settings, variant), param_pairs, params_file)
    if execution is not None:
        found = [m.model_copy(update={"execution": execution}) for m in found]
    label_map = labels_of(labels)
    if settings.embedded:
        from taskexec.embedded import interrupt_on_signals

        fleet = _embedded_fleet(settings)
        try:
            with interrupt_on_signals(), fleet:
                t0 = time.monotonic()
                results = _run_and_wait(
                    make_client(fleet.settings),
                    found,
                    tenant,
                    label_map,
                    as_json,
                    timeout,
                    run_ids=fleet.runs,
                    check=fleet.check,
                    stop_after=fleet.stop_grace,
                    ui=with_ui,
                )
                fleet.timings["execution"] = time.monotonic() - t0
        except KeyboardInterrupt as e:
            ended = ", ".join(f"run {r} {s.value}" for r, s in fleet.settled.items()) or "no run submitted"
            _interrupted(e, f"stopped the embedded worker and Redis; {ended}")
        if not all(r.status.terminal for r in results):
            # Not ended even once stopped: the fleet settled them as it stopped (``error``).
            # What is printed is what is stored.
            with make_client(fleet.settings) as reader:
                results = [reader.status(r.run_id) for r in results]
        ctx = click.get_current_context(silent=True)
        if ctx is not None and ctx.find_root().params.get("debug"):
            phases = ("startup", "redis", "store", "execution", "shutdown", "worker_stop")
            click.echo(
                "taskexec: embedded timings: "
                + " ".join(f"{k}={fleet.timings[k]:.3f}" for k in phases if k in fleet.timings),
                err=True,
            )
    else:
        run_ids: list[str] = []
        try:
            results = _run_and_wait(
                make_client(settings), found, tenant, label_map, as_json, timeout, run_ids=run_ids, ui=with_ui
            )
        except KeyboardInterrupt as e:
            if not run_ids:
                _interrupted(e, "no run submitted")
            _interrupted(
                e, f"stopped waiting; the fleet goes on with {' '.join(run_ids)} (taskexec watch RUN)"
            )
    _print_results(results, as_json=as_json, junit=junit)
    sys.exit(exit_for(results))


def _interrupted(exc: KeyboardInterrupt, what: str) -> NoReturn:
    """Exit 128 + the signal that interrupted a wait, saying what became of the runs."""
    import signal

    signum = int(getattr(exc, "signum", signal.SIGINT))
    click.echo(f"taskexec: interrupted by {signal.Signals(signum).name}: {what}", err=True)
    sys.exit(128 + signum)


def _embedded_fleet(settings: Settings) -> EmbeddedFleet:
    """The local worker and Redis of an embedded run, under ``settings.home``."""
    from taskexec.embedded import EmbeddedFleet

    return EmbeddedFleet(
        settings.home,
        concurrency=settings.worker_concurrency,
        base=settings,
        notify=lambda message: click.echo(f"taskexec: {message}", err=True),
    )


def rerun_embedded(run: RunRef, settings: Settings, act: Callable[[Client, str], str | None]) -> NoReturn:
    """``retry``/``resume`` of an embedded run when no ``taskexec run`` holds its fleet.

    The run is found in the store first (a bad id fails before anything starts); then the
    embedded worker and Redis start as for ``run``, ``act`` reopens the run (its message is
    printed; ``None``: nothing to do), and the run is followed to its end. Exit status as
    ``run``'s.
    """
    from taskexec import live
    from taskexec.embedded import interrupt_on_signals

    with make_client(settings) as reader:
        run_id = run.resolve(reader)
        reader.status(run_id)  # RunNotFoundError before the fleet starts
    fleet = _embedded_fleet(settings)
    try:
        with interrupt_on_signals(), fleet, make_client(fleet.settings) as client:
            message = act(client, run_id)
            if message is None:
                sys.exit(EXIT_OK)
            click.echo(message)
            fleet.runs.append(run_id)  # settled if the fleet has to stop first
            interactive = sys.stdout.isatty()
            results = live.follow(client, [run_id], interactive=interactive, check=fleet.check, tables=False)
    except KeyboardInterrupt as e:
        ended = ", ".join(f"run {r} {s.value}" for r, s in fleet.settled.items()) or f"run {run_id}"
        _interrupted(e, f"stopped the embedded worker and Redis; {ended}")
    _print_results(results, as_json=False, junit=None)
    sys.exit(exit_for(results))


def _run_and_wait(
    client: Client,
    found: list[RunManifest],
    tenant: str | None,
    labels: dict[str, str],
    as_json: bool,
    timeout: float | None,
    *,
    run_ids: list[str],
    check: Callable[[], None] | None = None,
    stop_after: float | None = None,
    ui: bool = False,
) -> list[RunResult]:
    """Submit, follow the runs to their end (live on a terminal) and return the results.

    ``run_ids`` receives each run's id as soon as it is submitted (an embedded fleet settles
    them if it has to stop early); ``check`` raises when the fleet running them died. With
    ``stop_after`` (embedded mode), runs that have not ended after ``timeout`` seconds are
    stopped (they end ``timed_out``) and followed that much longer to their end. With ``ui``
    the dashboard is served meanwhile (its URL on stderr: stdout's first line stays the id).
    """
    from taskexec import live
    from taskexec.run import producer

    with client, contextlib.ExitStack() as stack:
        if ui:
            from taskexec.ui import serve_in_background

            url, stop_ui = serve_in_background(client.services)
            stack.callback(stop_ui)
            click.echo(f"taskexec: dashboard at {url}", err=True)
        for manifest in found:
            run_ids.append(client.submit_all([manifest], tenant=tenant, labels=labels)[0].run_id)
            if not as_json:  # the id first, on a terminal and piped: `taskexec status PREFIX`
                click.echo(f"{run_ids[-1]}  {manifest.plan_id}/{manifest.variant}: submitted")
        interactive = not as_json and sys.stdout.isatty()
        results = live.follow(
            client, list(run_ids), interactive=interactive, timeout=timeout, check=check, tables=False
        )
        if stop_after is not None and not all(r.status.terminal for r in results):
            for r in results:
                if not r.status.terminal:
                    producer.cancel(client.services, r.run_id, reason="timeout")
            results = live.follow(
                client, list(run_ids), interactive=interactive, timeout=stop_after, check=check, tables=False
            )
    return results


def _print_results(results: list[RunResult], *, as_json: bool, junit: str | None) -> None:
    """The runs' results: JSON, a table each on a terminal, else a summary line each; JUnit XML."""
    from pathlib import Path

    interactive = not as_json and sys.stdout.isatty()
    if interactive:
        console = Console()
        for r in results:
            report.render_table(r, console)
    if junit:
        Path(junit).write_text(report.to_junit(results), encoding="utf-8")
    if as_json:
        click.echo(report.to_json(results))
    elif not interactive:
        for r in results:
            click.echo(report.summary_line(r))


@click.command()
@click.argument("plan", type=click.Path(dir_okay=True))
@click.option("--variant", default=None, help="Submit only this variant.")
@click.option("--tenant", default=None, help="Tenant to record with the runs.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label the runs (repeatable).")
@execution_option
@params_options
@user_errors
def submit(
    plan: str,
    variant: str | None,
    tenant: str | None,
    labels: tuple[str, ...],
    execution: str | None = None,
    param_pairs: tuple[str, ...] = (),
    params_file: str | None = None,
) -> None:
    """Submit PLAN to the fleet and print the run ids, one a line."""
    settings = Settings()
    found = with_params(manifests(plan, settings, variant), param_pairs, params_file)
    needs_fleet(settings, "submit (or `taskexec run`, which runs embedded)")
    submitting = make_client(settings).submit_all
    for handle in submitting(found, tenant=tenant, labels=labels_of(labels), execution=execution):
        click.echo(handle.run_id)


@click.command()
@run_argument
@click.option("--json", "as_json", is_flag=True, help="Print the run result as JSON.")
@user_errors
def status(run: RunRef, as_json: bool) -> None:
    """Show one run's result (RUN: its id, a unique prefix of 6+ characters, or --last);
    exit 1 when it ended without success."""
    client = make_client()
    run_id = run.resolve(client)
    result = client.status(run_id)
    if as_json:
        click.echo(report.to_json(result))
    else:
        report.render_table(result, Console())
        _print_approvals(result)
        if not result.status.terminal and not client.settings.embedded:
            _print_flow(client, run_id)
    failed = result.status.terminal and result.status is not RunStatus.SUCCEEDED
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _print_approvals(result: RunResult) -> None:
    """The question of each task waiting for approval, and the command that answers it."""
    for t in result.tasks:
        if t.status is TaskStatus.WAITING_APPROVAL:
            ask = (t.output or {}).get("approval") or {}
            question = ask.get("message") or "approve?"
            by = f", by {ask['deadline']}" if ask.get("deadline") else ""
            click.echo(
                f"{t.id} waits for approval: {question}  (taskexec approve {result.run_id} {t.id}{by})"
            )


def _print_flow(client: Client, run_id: str) -> None:
    """Rate limits and concurrency slots of a running run, one line each."""
    import redis

    try:
        flow = client.flow(run_id)
    except (redis.RedisError, OSError):
        return  # a status view without Redis still shows the store's truth
    for limit in flow.limits:
        click.echo(
            f"rate limit {limit.name} ({limit.scope}, {limit.per_minute:g}/min, burst {limit.burst}): "
            f"{limit.tokens:.1f} tokens available, {limit.waiting} task(s) waiting "
            f"({limit.reserved:.1f} tokens reserved for them)"
        )
    if flow.concurrency:
        click.echo(f"concurrency: {flow.running} of {flow.concurrency} slots held")


@click.command()
@run_argument
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "junit", "table", "html"]),
    default="table",
    show_default=True,
    help="Output format: JSON, JUnit XML (for CI), a table, or an HTML timeline page.",
)
@user_errors
def results(run: RunRef, fmt: str) -> None:
    """Print a run's task results as JSON, JUnit XML, a table or an HTML timeline."""
    client = make_client()
    result = client.status(run.resolve(client))
    if fmt == "json":
        click.echo(report.to_json(result))
    elif fmt == "junit":
        click.echo(report.to_junit([result]))
    elif fmt == "html":
        click.echo(report.to_html([result]))
    else:
        report.render_table(result, Console())
    sys.exit(exit_for([result]) if result.status.terminal else EXIT_OK)


@click.command()
@run_argument
@click.option("--timeout", type=float, default=None, help="Stop watching after this many seconds.")
@user_errors
def watch(run: RunRef, timeout: float | None) -> None:
    """Show a run's progress live until it ends; piped, a line per change, then the result."""
    from taskexec import live

    settings = Settings()
    if settings.embedded:  # the `taskexec run` in progress under home, if there is one
        from taskexec.embedded import attach

        settings = attach(settings) or settings
    client = make_client(settings)
    interactive = sys.stdout.isatty()
    run_id = run.text or "the run"
    try:
        with client:
            run_id = run.resolve(client)  # RunNotFoundError early
            [result] = live.follow(
                client, [run_id], interactive=interactive, timeout=timeout, on_change=click.echo
            )
    except KeyboardInterrupt:
        click.echo(f"taskexec: stopped watching {run_id}; the run goes on", err=True)
        sys.exit(130)
    if not interactive:
        click.echo(report.summary_line(result))
    sys.exit(exit_for([result]))


@click.command()
@run_argument
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to end, then print its final status.")
@user_errors
def cancel(run: RunRef, wait_: bool) -> None:
    """Cancel a run: queued tasks never run, running ones are told to stop.

    Prints ``RUN: cancelling`` while running tasks stop (the run ends ``cancelled`` when the
    last one has), or, with --wait, the run's final status once it has ended.
    """
    try:
        settings = fleet_or_embedded("cancel")
    except InvalidInputError:
        # No fleet and no embedded run in progress: fine for a run that has ended already
        # (its `taskexec run` has exited since), as cancelling an ended run says its status.
        with make_client() as reader:
            run_id = run.resolve(reader)
            ended = reader.status(run_id).status
        if not ended.terminal:
            raise
        click.echo(f"{run_id}: {ended.value}")
        return
    with make_client(settings) as client:
        run_id = run.resolve(client)
        status = client.cancel(run_id)
        if wait_ and not status.terminal:
            status = client.wait(run_id).status
    click.echo(f"{run_id}: {status.value if status.terminal else 'cancelling'}")


@click.command()
@run_argument
@user_errors
def resume(run: RunRef) -> None:
    """Send again every task of RUN with a message on its way or a worker on it.

    Safe while the run goes on: a task running under a live lease is waited for, never run
    a second time, and the run's status does not change. An embedded run whose ``taskexec
    run`` died goes on here: the embedded worker starts and the run is followed to its end.
    """
    settings = Settings()
    if settings.embedded:
        from taskexec.embedded import attach

        attached = attach(settings)
        if attached is None:
            with make_client(settings) as reader:
                over = reader.status(run.resolve(reader)).status.terminal
            if not over:  # its `taskexec run` died: go on with it here
                rerun_embedded(run, settings, _resumed)
        settings = attached or settings
    with make_client(settings) as client:
        run_id = run.resolve(client)
        n = client.resume(run_id) if not settings.embedded else 0
        status = client.status(run_id).status if not n else None
    if n:
        click.echo(f"{run_id}: {n} in-flight task(s) sent again")
    elif status is not None and status.terminal:
        ended = f"the run has ended ({status.value}); nothing to resume"
        click.echo(f"{run_id}: {ended} (`taskexec retry` runs failed tasks again)")
    else:
        click.echo(f"{run_id}: nothing in flight; the run goes on from the store")


def _resumed(client: Client, run_id: str) -> str:
    n = client.resume(run_id)
    return f"{run_id}: {n} in-flight task(s) sent again (embedded worker)"


@click.command(name="runs")
@click.option(
    "--status",
    "status_",
    type=click.Choice([s.value for s in RunStatus]),
    default=None,
    help="Only runs with this status.",
)
@click.option("--tenant", default=None, help="Only runs of this tenant.")
@click.option("--label", default=None, metavar="KEY=VALUE", help="Only runs with this label.")
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many runs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@user_errors
def runs_(status_: str | None, tenant: str | None, label: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    pair = next(iter(labels_of((label,)).items())) if label else None
    found = make_client().runs(status=status_, tenant=tenant, label=pair, limit=limit)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in found], indent=2))
        return
    for r in found:
        s = r.statistics
        click.echo(
            f"{r.run_id}  {r.submitted_at:%Y-%m-%d %H:%M:%S}  {r.status.value:<10} "
            f"{r.plan_id}/{r.variant}  {s.succeeded}/{s.total} succeeded"
        )
