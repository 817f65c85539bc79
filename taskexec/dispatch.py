"""Stage-by-stage dispatch and the end of a run; shared by the producer and ``advance``.

Each stage is one chord: ``chord(group(execute | validate ...), advance(run, k + 1))``.
No canvas embeds a later stage: ``advance`` reads stage k + 1 from the store when stage
k is complete, so messages stay small whatever the plan's size. Messages carry ids, never
params or outputs.

Every step is idempotent. The right to dispatch a stage is taken by a conditional UPDATE
of the run's stage cursor, so a chord body that runs twice dispatches once; a run ends by
a conditional UPDATE of its status, so it ends once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery, chord
from celery.canvas import Signature
from sqlalchemy import update
from sqlalchemy.orm import Session

from taskexec import events
from taskexec.celery_app import CONTROL, EXECUTOR, VALIDATOR
from taskexec.errors import BrokerUnavailableError
from taskexec.models import ErrorCode, ManifestTask, RunManifest, RunStatistics, RunStatus, TaskStatus
from taskexec.ratelimit import RateLimiter, bucket_key
from taskexec.settings import Settings
from taskexec.store import Store, results
from taskexec.store import repository as repo
from taskexec.store.tables import Run, utcnow

__all__ = [
    "CompiledRun",
    "compiled_run",
    "dispatch",
    "finalize",
    "broker_instance",
    "execute_signature",
    "release",
    "send_release",
    "stage_settled",
    "message_id",
    "request_stop",
    "send_dispatch",
    "send_notice",
]

log = logging.getLogger(__name__)

#: Seconds a hard time limit gives a task beyond its soft limit to clean up.
HARD_LIMIT_GRACE = 10.0


@dataclass(frozen=True)
class CompiledRun:
    """A run's manifest with lookups, cached per process: manifests never change."""

    manifest: RunManifest
    tasks: dict[str, ManifestTask] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)  # artifact -> task ids (case order)


#: run id -> parsed manifest, per process (bounded: cleared when it grows past 256 runs).
_by_run: dict[str, CompiledRun] = {}


def compiled_run(session: Session, run_id: str) -> CompiledRun:
    """The manifest of a run, parsed once per process."""
    found = _by_run.get(run_id)
    if found is None:
        run = repo.get_run(session, run_id)
        found = _parse(run.manifest)
        if len(_by_run) > 256:
            _by_run.clear()
        _by_run[run_id] = found
    return found


def _parse(manifest: dict[str, Any]) -> CompiledRun:
    m = RunManifest.model_validate(manifest)
    producers: dict[str, list[str]] = {}
    for t in m.tasks:
        if t.output:
            producers.setdefault(t.output, []).append(t.id)
    return CompiledRun(m, {t.id: t for t in m.tasks}, producers)


def message_id(run_id: str, task_id: str, epoch: int) -> str:
    """The Celery id of a task's execute message: known without a lookup, so cancel can revoke it."""
    return f"{run_id}/{task_id}/{epoch}"


def execute_signature(
    app: Celery,
    run_id: str,
    task: ManifestTask,
    *,
    task_id: str | None = None,
    detached: bool = False,
    countdown: float | None = None,
    eta: datetime | None = None,
) -> Signature:
    """The ``execute`` (``| validate`` when the task has criteria) of one task, with its time
    limits, its priority and an ``argsrepr`` of ids (never params: they may hold secrets).

    Every message that executes a task is built here: a stage's chord, a re-execution after
    failed criteria, a detached delivery of the reconciler.
    """
    where = f"run={run_id} task={task.id} stage={task.stage}" + (" detached" if detached else "")
    opts: dict[str, Any] = {
        "queue": EXECUTOR,
        "soft_time_limit": task.timeout,
        "time_limit": task.timeout + HARD_LIMIT_GRACE,
        # Redis priority steps: 0 is consumed first; a plan's 9 is its highest priority.
        "priority": 9 - task.priority,
        "argsrepr": where,
    }
    if task_id is not None:
        opts["task_id"] = task_id
    if countdown is not None:
        opts["countdown"] = countdown
    if eta is not None:
        opts["eta"] = eta
    kwargs = {"detached": True} if detached else {}
    sig = app.signature(
        "taskexec.execute", args=(run_id, task.id), kwargs=kwargs, options=opts, immutable=True
    )
    if task.validate_:
        check = {"queue": VALIDATOR, "priority": 9 - task.priority, "argsrepr": where}
        sig = sig | app.signature("taskexec.validate", options=check)
    return sig


def _signature(
    app: Celery, run_id: str, task: ManifestTask, epoch: int, eta: datetime | None = None
) -> Signature:
    return execute_signature(app, run_id, task, task_id=message_id(run_id, task.id, epoch), eta=eta)


def send_dispatch(app: Celery, run_id: str, stage: int) -> None:
    """Ask a control worker to dispatch ``stage`` of a run (submit and resume do this).

    The producer publishes one small message rather than the stage's chord: the chord is
    built where every later one is, and ``ignore_result`` keeps the Redis result backend
    from subscribing the producer to a result channel it would never read (a pending
    result whose ``__del__`` reconnects to Redis at interpreter exit).
    """
    app.send_task(
        "taskexec.dispatch",
        args=(run_id, stage),
        queue=CONTROL,
        ignore_result=True,
        argsrepr=f"run={run_id} stage={stage}",
    )


def request_stop(session: Session, run_id: str, reason: str) -> bool:
    """Mark a run as stopping (cancelled, max_failures, timeout); true if this call did it."""
    stmt = (
        update(Run)
        .where(Run.run_id == run_id, Run.stop_reason.is_(None))
        .values(stop_reason=reason, updated_at=utcnow())
    )
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def _run_timed_out(run: Run, manifest: RunManifest) -> bool:
    limit = manifest.stop.timeout
    return bool(limit and run.started_at and (utcnow() - run.started_at).total_seconds() > limit)


#: Ended without success: a task downstream of one of these is skipped (E009).
_BLOCKING = frozenset(s for s in TaskStatus if s.terminal and s is not TaskStatus.SUCCEEDED)


def _sort_out(
    tasks: Sequence[ManifestTask], statuses: dict[str, TaskStatus]
) -> tuple[list[ManifestTask], dict[str, list[str]]]:
    """Which waiting tasks can run now, and which are skipped (by reason); the rest are held.

    A task runs when every dependency succeeded, is skipped when one ended without success,
    and is held (left pending) while one has not ended: an approval gate it waits for, or
    a task held itself. Queued tasks are re-dispatched as they are (``resume``).
    """
    runnable: list[ManifestTask] = []
    skipped: dict[str, list[str]] = {}
    for t in tasks:
        if statuses[t.id] not in (TaskStatus.PENDING, TaskStatus.QUEUED):
            continue
        bad = next((d for d in t.depends_on if statuses[d] in _BLOCKING), None)
        if bad is not None and statuses[t.id] is TaskStatus.PENDING:
            skipped.setdefault(f"upstream task {bad!r} ended {statuses[bad].value}", []).append(t.id)
        elif all(statuses[d] is TaskStatus.SUCCEEDED for d in t.depends_on):
            runnable.append(t)
    return runnable, skipped


def _skip(session: Session, run_id: str, skipped: dict[str, list[str]]) -> list[repo.Change]:
    changes: list[repo.Change] = []
    for why, ids in sorted(skipped.items()):
        changes += repo.set_tasks_status(
            session,
            run_id,
            ids,
            TaskStatus.SKIPPED,
            allowed_from=[TaskStatus.PENDING],
            error_code=ErrorCode.UPSTREAM_FAILED,
            message=why,
        )
    return changes


def _stop_everything(session: Session, run: Run, manifest: RunManifest) -> list[repo.Change]:
    """A stopped run: what has not started (or waits for a decision) is cancelled."""
    return repo.set_tasks_status(
        session,
        run.run_id,
        [t.id for t in manifest.tasks],
        TaskStatus.CANCELLED,
        allowed_from=[TaskStatus.PENDING, TaskStatus.WAITING_APPROVAL],
        error_code=ErrorCode.CANCELLED,
        message=f"run stopped: {run.stop_reason}",
    )


def _queue(session: Session, run_id: str, tasks: list[ManifestTask], why: str) -> list[repo.Change]:
    changes = repo.set_tasks_status(
        session, run_id, [t.id for t in tasks], TaskStatus.QUEUED, allowed_from=[TaskStatus.PENDING]
    )
    started = repo.set_run_status(session, run_id, RunStatus.RUNNING, message=why)
    return changes + ([started] if started else [])


def dispatch(
    app: Celery, store: Store, run_id: str, stage: int, *, client: redis.Redis | None = None
) -> None:
    """Dispatch ``stage`` of a run, or the first later stage with work; end the run after the last.

    Tasks whose dependencies did not all succeed are ``skipped`` (E009), tasks behind an
    approval gate are held; when a stop was requested, what was not dispatched is
    ``cancelled`` (E004).
    """
    while True:
        changes: list[repo.Change] = []
        publish: tuple[list[ManifestTask], int] | None = None
        with store.begin() as s:
            run = repo.get_run(s, run_id)
            if RunStatus(run.status).terminal and run.status != RunStatus.ERROR:
                return
            cr = compiled_run(s, run_id)
            m = cr.manifest
            if stage >= len(m.stages):
                break
            if not repo.claim_stage(s, run_id, stage):
                return  # another copy of this step dispatched it
            if run.stop_reason is None and _run_timed_out(run, m):
                request_stop(s, run_id, "timeout")
                run.stop_reason = "timeout"
            if run.stop_reason is not None:
                changes += _stop_everything(s, run, m)
                s.execute(update(Run).where(Run.run_id == run_id).values(stage_cursor=len(m.stages)))
                stage = len(m.stages)
            else:
                statuses = repo.task_statuses(s, run_id)
                runnable, skipped = _sort_out([cr.tasks[t] for t in m.stages[stage]], statuses)
                changes += _skip(s, run_id, skipped)
                if runnable:
                    changes += _queue(s, run_id, runnable, f"stage {stage} dispatched")
                    publish = (runnable, run.epoch)
                    tenant = run.tenant
        events.publish(client, changes)
        if publish and publish[0]:
            tasks, epoch = publish
            pace = _pacing(app, client, m, run_id, tenant, tasks)
            _publish_stage(app, store, run_id, stage, tasks, epoch, pace)
            return
        stage += 1
    finalize(store, run_id, client=client)


def release(app: Celery, store: Store, run_id: str, *, client: redis.Redis | None = None) -> None:
    """Dispatch held tasks whose dependencies have all ended, in stages already dispatched.

    Runs after an approval is decided, after ``taskexec retry`` reopened tasks, and as the
    body of the chord of each batch it sends, until nothing is held; then the run goes on
    to its next stage, or ends.
    """
    changes: list[repo.Change] = []
    publish: tuple[list[ManifestTask], int] | None = None
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return
        cr = compiled_run(s, run_id)
        m = cr.manifest
        cursor = run.stage_cursor
        if run.stop_reason is not None:
            changes += _stop_everything(s, run, m)
        else:
            statuses = repo.task_statuses(s, run_id)
            held = [t for t in m.tasks if t.stage <= cursor and statuses[t.id] is TaskStatus.PENDING]
            while True:  # a skip can unblock (and skip) what waits behind it
                runnable, skipped = _sort_out(held, statuses)
                if not skipped:
                    break
                changes += _skip(s, run_id, skipped)
                statuses.update({t: TaskStatus.SKIPPED for ids in skipped.values() for t in ids})
            if runnable:
                queued = _queue(s, run_id, runnable, "held tasks released")
                changes += queued
                # Only what this call moved: a release running at the same time sends the rest.
                mine = {c.task_id for c in queued}
                publish = ([t for t in runnable if t.id in mine], run.epoch)
        settled = cursor >= 0 and stage_settled(s, run_id, cursor)
    events.publish(client, changes)
    if publish and publish[0]:
        tasks, epoch = publish
        _publish_stage(app, store, run_id, None, tasks, epoch)
    elif settled and cursor + 1 < len(m.stages):
        dispatch(app, store, run_id, cursor + 1, client=client)
    else:
        finalize(store, run_id, client=client)


def send_release(app: Celery, run_id: str) -> None:
    """Ask a control worker to :func:`release` a run's held tasks (approve, retry)."""
    app.send_task(
        "taskexec.release", args=(run_id,), queue=CONTROL, ignore_result=True, argsrepr=f"run={run_id}"
    )


def _pacing(
    app: Celery,
    client: redis.Redis | None,
    m: RunManifest,
    run_id: str,
    tenant: str | None,
    tasks: list[ManifestTask],
) -> dict[str, datetime]:
    """Times (ETAs) that spread a stage's rate-limited tasks over what their buckets allow.

    Sent all at once, the tasks of a stage would all ask for a token at once, and all but
    the burst would be refused and re-queued, each refusal a trip through a worker that
    delays the tasks whose turn has come. Sent with these ETAs (the k-th task of a bucket
    when, at the rate, the bucket as it stands now will hold a token for it), they arrive
    about when their tokens do. Absolute times, not countdowns: publishing a large chord
    takes a while, and countdowns would add that to each task's time. Only a hint: the
    worker still asks the bucket. None past ``max_throttle_wait`` (a message with an ETA
    waits in a worker's memory, and Redis delivers it again past half the visibility
    timeout): those tasks ask at once, and take their turn in the bucket's line.
    """
    limited = [t for t in tasks if t.rate_limit is not None]
    if client is None or not limited:
        return {}
    settings: Settings = app.conf.taskexec_settings
    horizon = min(settings.max_throttle_wait, settings.visibility_timeout / 2)
    limiter = RateLimiter(client)
    now = datetime.now(UTC)
    pace: dict[str, datetime] = {}
    ahead: dict[str, float] = {}  # bucket -> tokens short before the next task of it
    for t in limited:
        assert t.rate_limit is not None
        limit = m.rate_limits[t.rate_limit]
        key = bucket_key(t.rate_limit, limit, run_id=run_id, tenant=tenant)
        if key not in ahead:
            try:
                tokens, _ = limiter.peek(key, limit)  # below zero by the tokens reserved
            except redis.RedisError:
                return {}
            ahead[key] = -tokens
        ahead[key] += 1
        rate = limit.per_minute / 60.0
        # A little early (half a token's time, at most 20 ms): a task that arrives late
        # leaves its token unused past the burst, a time no later task makes up; one that
        # arrives early waits in its worker for the token (workers.runner.SHORT_WAIT).
        wait = ahead[key] / rate - min(0.02, 0.5 / rate)
        if 0 < wait <= horizon:
            pace[t.id] = now + timedelta(seconds=wait)
    return pace


def _publish_stage(
    app: Celery,
    store: Store,
    run_id: str,
    stage: int | None,
    tasks: list[ManifestTask],
    epoch: int,
    pace: dict[str, datetime] | None = None,
) -> None:
    """Send a chord of tasks; if the broker refuses it, undo the dispatch in the store.

    ``stage`` is the stage dispatched (its body dispatches the next one), or ``None`` for a
    batch of released tasks (its body releases again). ``pace``: ETAs by task id.
    """
    pace = pace or {}
    header = [_signature(app, run_id, t, epoch, pace.get(t.id)) for t in tasks]
    if stage is None:
        body = app.signature(
            "taskexec.release",
            args=(run_id,),
            immutable=True,
            options={"queue": CONTROL, "argsrepr": f"run={run_id}"},
        )
    else:
        body = app.signature(
            "taskexec.advance",
            args=(run_id, stage + 1),
            immutable=True,
            options={"queue": CONTROL, "argsrepr": f"run={run_id} stage={stage + 1}"},
        )
    on_error = app.signature(
        "taskexec.stage_failed",
        args=(run_id, -1 if stage is None else stage),
        immutable=True,
        options={"queue": CONTROL, "argsrepr": f"run={run_id} stage={stage}"},
    )
    body.link_error(on_error)
    try:
        chord(header, body, app=app).apply_async()
        instance = broker_instance(app)
    except Exception as e:  # kombu and redis-py raise many types for one broken connection
        # Committed "queued" rows with no message would wait forever: put them back, so that
        # the retry of this step (or the reconciler) dispatches them again.
        with store.begin() as s:
            repo.set_tasks_status(
                s, run_id, [t.id for t in tasks], TaskStatus.PENDING, allowed_from=[TaskStatus.QUEUED]
            )
            if stage is not None:
                undo = update(Run).where(Run.run_id == run_id, Run.stage_cursor == stage)
                s.execute(undo.values(stage_cursor=stage - 1))
        raise BrokerUnavailableError(f"cannot reach the broker to dispatch {len(tasks)} task(s): {e}") from e
    with store.begin() as s:
        s.execute(update(Run).where(Run.run_id == run_id).values(broker_instance=instance))


def broker_instance(app: Celery) -> str | None:
    """The broker's Redis server identity (``INFO`` run_id): it changes when Redis restarts."""
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        run_id: str | None = client.info("server").get("run_id")
        return run_id


def stage_settled(session: Session, run_id: str, stage: int) -> bool:
    """Whether no task of ``stage`` has a message on its way or a worker on it.

    The rest of the stage has ended, waits for an approval, or is held behind one: the next
    stage may go (what depends on a held task is held in turn).
    """
    return not any(s in repo.ACTIVE for s in repo.task_statuses(session, run_id, stage).values())


def finalize(
    store: Store, run_id: str, *, client: redis.Redis | None = None, error: str | None = None
) -> RunStatus | None:
    """End a run whose tasks are all terminal (never-dispatched ones become ``cancelled``).

    With ``error``, the run ends ``error`` with that message whatever its tasks did (an
    infrastructure failure); ``taskexec resume`` can pick it up again.
    Returns the final status, or ``None`` when the run is not over or has already ended.
    """
    changes: list[repo.Change] = []
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return None
        statuses = repo.task_statuses(s, run_id)
        if error is None and any(st in repo.UNSETTLED for st in statuses.values()):
            return None
        pending = [tid for tid, st in statuses.items() if st is TaskStatus.PENDING]
        if error is None and pending:
            changes += repo.set_tasks_status(
                s,
                run_id,
                pending,
                TaskStatus.CANCELLED,
                allowed_from=[TaskStatus.PENDING],
                error_code=ErrorCode.CANCELLED,
                message=f"run stopped: {run.stop_reason or 'ended'}",
            )
        result = results.run_result(s, run_id)
        if error is not None:
            final = RunStatus.ERROR
        elif run.stop_reason == "cancelled":
            final = RunStatus.CANCELLED
        elif run.stop_reason == "timeout":
            final = RunStatus.TIMED_OUT
        elif all(t.status is TaskStatus.SUCCEEDED for t in result.tasks):
            final = RunStatus.SUCCEEDED
        else:
            final = RunStatus.FAILED
        now = utcnow()
        started = run.started_at or run.submitted_at
        stats = RunStatistics.of(result.tasks, round((now - started).total_seconds(), 3))
        change = repo.set_run_status(
            s,
            run_id,
            final,
            message=error or run.stop_reason,
            statistics=stats.model_dump(mode="json"),
            error_message=error,
            finished_at=now,
        )
        if change is None:
            return None
        changes.append(change)
        manifest = compiled_run(s, run_id).manifest
        wants_notice = any("run_finished" in n.events for n in manifest.notify)
        stopped, tenant = run.stop_reason is not None or error is not None, run.tenant
    events.publish(client, changes)
    if stopped and client is not None:
        _give_back_tokens(client, run_id, tenant, manifest)
    if wants_notice:
        send_notice(run_id, "run_finished")
    return final


def _give_back_tokens(client: redis.Redis, run_id: str, tenant: str | None, manifest: RunManifest) -> None:
    """Return the tokens its buckets reserved for a stopped run's tasks that waited in line.

    Those tasks will not come back for them (they were cancelled): other runs sharing a
    bucket would otherwise wait for tokens promised to nobody until the line forgets them.
    """
    limiter = RateLimiter(client)
    for name, limit in manifest.rate_limits.items():
        key = bucket_key(name, limit, run_id=run_id, tenant=tenant)
        try:
            limiter.give_back(key, limit, run_id=run_id)
        except redis.RedisError as e:  # they come back by themselves 30 s after their turn
            log.warning("tokens of run %s not given back to %s: %s", run_id, key, e)


def send_notice(run_id: str, event: str, task_id: str | None = None) -> None:
    """Queue a webhook notice (``taskexec.notify``); it never blocks or fails the run."""
    from taskexec.celery_app import app

    try:
        app.send_task(
            "taskexec.notify",
            args=(run_id, event, task_id),
            queue=CONTROL,
            ignore_result=True,
            argsrepr=f"run={run_id} event={event}" + (f" task={task_id}" if task_id else ""),
        )
    except Exception as e:  # the broker is down: the run's own state is already safe
        log.warning("notice %s of run %s not sent: %s", event, run_id, e)


def active_task_ids(session: Session, run_id: str) -> Sequence[str]:
    """Ids of a run's tasks that are queued, running, retrying or validating."""
    return [t for t, s in repo.task_statuses(session, run_id).items() if s in repo.ACTIVE]
